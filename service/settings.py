"""All configuration in one typed place: environment variables with the ``AUTOMR_`` prefix.

``REDIS_URL`` (no prefix, the usual convention) is accepted as well as ``AUTOMR_REDIS_URL``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.modes import Mode, SlotPolicy


def _default_home() -> Path:
    return Path.home() / ".cache" / "automr"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOMR_", extra="ignore")

    @field_validator("dtype", mode="after")
    @classmethod
    def _concrete_dtype(cls, v: str) -> str:
        from model.llm import auto_dtype  # torch only when the settings are read

        return auto_dtype() if v == "auto" else v

    # where fetched assets, prepared data, artefacts and the embedded Redis live
    home: Path = Field(default_factory=_default_home)

    # model
    model_path: Path | None = None  # HF directory or GGUF file; None = the embedded SmolLM2 GGUF
    cut_layer: int = 20  # L: memory vectors are layer-L states
    # "auto": bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX), else float32 (resolved here,
    # so /version and the results name the dtype actually used)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    k_short: int = 10

    # data and artefacts
    dataset: str = "ml-100k"
    data_dir: Path | None = None  # default: home/data/<dataset>
    artefacts_dir: Path | None = None  # default: <data_dir>/artefacts (as `automr evaluate` uses)

    # redis
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AUTOMR_REDIS_URL", "REDIS_URL")
    )

    # http
    host: str = "127.0.0.1"
    port: int = 8000
    # an idle keep-alive connection is closed after this long. Keep it above the idle timeout of the
    # clients and load balancers in front (aiohttp 15 s, AWS ALB and nginx 60 s): when the server
    # closes first, a request sent on that connection at the same moment is dropped, which the client
    # sees as a disconnect (uvicorn's own default, 5 s, did that in a load run: BENCHMARKS §4)
    keep_alive_s: float = Field(default=75.0, gt=0)

    # ---- the online service (`automr serve`; docs/SERVICE.md) ----
    # pieces: default ARTEFACTS/generator and ARTEFACTS/retriever
    generator_dir: Path | None = None
    retriever_dir: Path | None = None
    # what fills the memory slot; None = "learned" when a retriever artefact exists, else "none"
    slot_policy: SlotPolicy | None = None
    # memory element kind; None = the retriever's (train_report.json), else window
    memory_element: Literal["window", "item"] | None = None
    max_new_tokens: int = Field(default=32, ge=1, le=256)
    # ranking: beams over the catalogue's title trie (seen items pruned) first, then L2 grounding of the
    # best beam's title for the rest (model/generation/beams.py); constrained=false: greedy + L2 (num_beams is
    # then unused), BIGRec as its paper defines it
    constrained: bool = True
    num_beams: int = Field(default=20, ge=1, le=64)
    # beam search: gamma of the popularity prior (ARTEFACTS/popularity.json; 0 = the generator alone);
    # 3 is the best of {1, 3} on validation for the quick-start model, and of {3, 6} for an 8,000-target
    # one (BENCHMARKS §2.3)
    popularity_gamma: float = Field(default=3.0, ge=0)
    # beam search: weight of the popularity share in a mixture with the generator's probability (0 = off)
    popularity_mix: float = Field(default=0.0, ge=0, le=1)
    llm_batch_size: int = Field(default=16, ge=1)
    head_cache: bool = True  # reuse the prompt template head's KV cache (RecommenderConfig.head_cache)
    # padded prompt tokens per prefill group (RecommenderConfig.prefill_max_tokens; longer prompts alone)
    prefill_max_tokens: int = Field(default=2048, ge=1)
    # speculative decoding steps (RecommenderConfig.draft_tokens / draft_max_rows): while at most
    # draft_max_rows rows decode, each step also checks up to draft_tokens tokens guessed from the
    # catalogue's titles; 0 = off (BENCHMARKS §3.3)
    draft_tokens: int = Field(default=8, ge=0, le=64)
    draft_max_rows: int = Field(default=2, ge=1)
    # contexts of recent answers the draft table learns from (NgramDrafter.max_recent); 0 = catalogue only
    draft_learn: int = Field(default=50_000, ge=0)
    # grounding embeddings by text (model/grounding_memo.py): catalogue titles from the index, and the
    # last ground_memo_recent distinct other answers, embedded once; false = embed every answer
    ground_memo: bool = True
    ground_memo_recent: int = Field(default=10_000, ge=0)
    # intra-op threads of the model; None = the CPUs this process may use (its affinity and cgroup
    # quota: service/cpu_budget.py)
    torch_threads: int | None = Field(default=None, ge=1)
    # the model thread drops to one intra-op thread while another job takes the CPUs, and goes back
    # to torch_threads once they are free (service/thread_governor.py)
    adaptive_threads: bool = True
    # forwards of at least this many fed tokens (rows x new positions) run in row parts, one per
    # intra-op thread, each part on a thread of one intra-op thread (model/row_split.py); 0 = off
    row_split_min_tokens: int = Field(default=128, ge=0)
    # `automr serve`'s allocator (service/serve_env.py): auto = jemalloc when libjemalloc.so.2 is
    # installed, else glibc as it is; glibc = glibc tuned to return memory (slower); system = leave the
    # process's environment alone
    malloc: Literal["auto", "jemalloc", "glibc", "system"] = "auto"
    # POST /interactions: events per request (more: 413)
    max_batch_events: int = Field(default=1000, ge=1)
    # memory vectors of new events: encoded by a background worker right after the append
    encode_on_write: bool = True
    encoder_queue_size: int = Field(default=1024, ge=1)  # users waiting; when full, recommend encodes lazily
    encoder_batch_users: int = Field(default=16, ge=1)  # users encoded in one model call
    # start-up seeding of the store from DATA/interactions.csv (once per dataset: a marker key)
    seed_store: bool = True
    # redis
    redis_namespace: str = "automr"
    redis_appendfsync: Literal["always", "everysec", "no"] = "always"  # embedded server only
    redis_timeout_s: float = Field(default=5.0, gt=0)
    redis_breaker_s: float = Field(default=1.0, ge=0)  # after a timeout, fail Redis calls at once for this long
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_json: bool = True  # structured (one JSON object per line) logs with the request id

    # ---- production serving (issue 6) ----
    # dynamic batching of concurrent /recommend calls into one LLM pass
    batch_max_size: int = Field(default=16, ge=1)  # requests decoded together (continuous batching; a request's beams count once)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)  # how long the first request waits for company
    # how long an answer done decoding waits for others to be grounded with it, while other rows decode
    ground_max_wait_ms: float = Field(default=100.0, ge=0)
    # priority between modes (service/priority.py): requests of these modes yield to the others. They
    # are taken after them, their prefills run in chunks of background_chunk_tokens padded tokens
    # (back to back when nothing else is live) and, while other work is live, only within
    # background_share of the model's time. [] = first come, first served (BENCHMARKS §4.3)
    background_modes: list[Mode] = ["full-history"]
    background_share: float = Field(default=0.25, ge=0, lt=1)
    background_chunk_tokens: int = Field(default=256, ge=1)
    max_queue: int = Field(default=64, ge=1)  # requests waiting for the model; more -> 429 + Retry-After
    # security and limits
    api_key: SecretStr | None = None  # when set: `Authorization: Bearer <key>` on every non-health endpoint
    max_body_bytes: int = Field(default=1_000_000, ge=1024)  # larger request bodies -> 413
    shutdown_grace_s: float = Field(default=30.0, ge=0)  # drain in-flight requests and the encoder on SIGTERM
    # once loaded, move every object (model, catalogue: ~650k) out of the garbage collector's sight
    # (gc.freeze): a full collection over them stalls the process ~0.5 s. Process-wide: off in tests
    gc_freeze: bool = True

    def generation(self) -> dict:
        """How the service generates (``RecommenderConfig`` fields). Also the LLM methods' defaults in
        ``automr evaluate`` and ``automr reproduce``, so that evaluated figures come from the served path."""
        return dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams if self.constrained else 1,
                    constrained=self.constrained,
                    popularity_gamma=self.popularity_gamma, popularity_mix=self.popularity_mix,
                    head_cache=self.head_cache,
                    prefill_max_tokens=self.prefill_max_tokens, draft_tokens=self.draft_tokens,
                    draft_max_rows=self.draft_max_rows, ground_memo=self.ground_memo)

    def resolved_data_dir(self) -> Path:
        return self.data_dir or self.home / "data" / self.dataset

    def resolved_artefacts_dir(self) -> Path:
        return self.artefacts_dir or self.resolved_data_dir() / "artefacts"


def get_settings() -> Settings:
    return Settings()
