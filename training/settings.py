"""Training settings, read from FACESET_* environment variables."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO = Path(__file__).resolve().parent.parent


class TrainingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACESET_", extra="ignore")

    data_dir: Path = Field(
        default=_REPO.parent / "shared" / "data",
        description="Root of the real face data (celeba-299/, celeba-10k-aligned/, lfw-dev/, orl/). "
        "FACESET_DATA_DIR. Tests needing it skip where it is absent.",
    )
    aligned_dir: Path = Field(
        default=_REPO / "runs" / "aligned",
        description="Aligned face crops written by training.data.align_tool (never committed). FACESET_ALIGNED_DIR.",
    )
    runs_dir: Path = Field(default=_REPO / "runs", description="Where training runs write checkpoints and logs. FACESET_RUNS_DIR.")
    num_threads: int = Field(default=0, description="torch intra-op threads; 0 keeps torch's default. FACESET_NUM_THREADS.")
    dist_timeout_s: float = Field(
        default=7200.0, gt=0,
        description="How long a DDP collective waits for the other ranks before the run aborts (NCCL's default, "
        "10 minutes, is shorter than rank 0 aligning a data set or evaluating while the others wait); a hung rank "
        "is noticed only after this. FACESET_DIST_TIMEOUT_S.",
    )


    def base_dir(self, base: str) -> Path:
        """The folder a config's relative path is taken under: "data" or "aligned"."""
        return {"data": self.data_dir, "aligned": self.aligned_dir}[base]


def get_settings() -> TrainingSettings:
    return TrainingSettings()
