"""All configuration in one typed place: environment variables with the ``AUTOMR_`` prefix.

``REDIS_URL`` (no prefix, the usual convention) is accepted as well as ``AUTOMR_REDIS_URL``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "automr"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOMR_", extra="ignore")

    # where fetched assets, prepared data, artefacts and the embedded Redis live
    home: Path = Field(default_factory=_default_home)

    # model
    model_path: Path | None = None  # HF directory or GGUF file; None = the embedded SmolLM2 GGUF
    cut_layer: int = 20  # L: memory vectors are layer-L states
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    k_short: int = 10

    # data and artefacts
    dataset: str = "ml-100k"
    data_dir: Path | None = None  # default: home/data/<dataset>
    artefacts_dir: Path | None = None  # default: home/artefacts/<dataset>

    # redis
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AUTOMR_REDIS_URL", "REDIS_URL")
    )

    # http
    host: str = "127.0.0.1"
    port: int = 8000

    def resolved_data_dir(self) -> Path:
        return self.data_dir or self.home / "data" / self.dataset

    def resolved_artefacts_dir(self) -> Path:
        return self.artefacts_dir or self.home / "artefacts" / self.dataset


def get_settings() -> Settings:
    return Settings()
