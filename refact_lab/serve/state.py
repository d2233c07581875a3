"""What is served, decided on disk: the contract between the panels (in a kernel) and the server's engine.

The Model hosting and Deploy panels run inside a Voilà or notebook kernel, a different process from the
jupyter_server that holds the model. They never reach into the server's memory. Instead:

1. **Choices live in `settings.json`** (the state directory's, written atomically and 0600 through
   `Home.update_settings`): the base model and where it runs (`model`, `device`, `dtype`,
   `gpu_memory_fraction`, `max_batch`: fields of `ServeSettings`), the deployed LoRA (`lora`: a `LoraChoice`),
   and upstream engines (`openai_api_key`, `openai_base_url`, `openai_models`, `upstream_url`,
   `upstream_api_key`, `upstream_models`). A restart of the server finds the same choices.
2. **The engine watches that file.** Its scheduler thread stats `settings.json` between decoding steps (at most
   every `poll_interval`, a cheap stat) and applies a change at a step boundary: a new LoRA choice loads the
   adapter and bumps `caps_version` without a restart; a new base model drains in-flight requests, then
   reloads. "best" and "latest" are re-resolved every few seconds too, so a run that writes a better
   checkpoint is picked up.
3. **Live state comes back over HTTP.** The services read the engine's state (loading / ready / failed with
   the reason, memory, deployed adapter, caps_version) from `GET /v1/refact-lab/status` with the token from
   `REFACT_LAB_TOKEN`, and the playground calls `POST /v1/completions`: the panel is just another API client.
   Without a server (a notebook on its own, the CLI), the services drive an in-process `Engine` that watches
   the same file, so the same code paths run.

The file is the single source of truth; the HTTP status is a read-only view of how far the engine got in
applying it (`applied` vs `requested` in the status), which the services wait on after a change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from refact_lab.home import check_name

LORA_MODES = ("off", "best", "latest", "checkpoint")
SERVING_KEYS = ("model", "device", "dtype", "gpu_memory_fraction", "max_batch")
UPSTREAM_KEYS = ("openai_api_key", "openai_base_url", "openai_models", "upstream_url", "upstream_api_key",
                 "upstream_models")
LORA_SUFFIX = ":lora"  # the fine-tuned variant of base model B is served as "B:lora"


@dataclass(frozen=True)
class LoraChoice:
    """Which LoRA checkpoint is deployed.

    off: the base model only. best / latest: the best (lowest test loss) or the newest checkpoint of the most
    recent run (or of `run_id` when given). checkpoint: a specific `run_id` + `checkpoint` ("step-000200").
    """

    mode: str = "off"
    run_id: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise ValueError(f"lora: {self.mode!r} is not one of {', '.join(LORA_MODES)}")
        if self.run_id is not None:
            check_name(self.run_id, "run id")
        if self.checkpoint is not None:
            check_name(self.checkpoint, "checkpoint name")
        if self.mode == "checkpoint" and not (self.run_id and self.checkpoint):
            raise ValueError("lora: a specific checkpoint needs both a run id and a checkpoint name")

    @classmethod
    def parse(cls, text: str | None) -> "LoraChoice":
        """'off' | 'best' | 'latest' | 'RUN_ID' (its best) | 'RUN_ID/CHECKPOINT' (the CLI's --lora)."""
        text = (text or "off").strip()
        if text in ("off", "best", "latest"):
            return cls(text)
        if "/" in text:
            run_id, checkpoint = text.split("/", 1)
            return cls("checkpoint", run_id, checkpoint)
        return cls("best", run_id=text)

    @classmethod
    def from_settings(cls, settings: dict) -> "LoraChoice":
        raw = settings.get("lora")
        if isinstance(raw, str):
            return cls.parse(raw)
        if isinstance(raw, dict):
            return cls(raw.get("mode", "off"), raw.get("run_id"), raw.get("checkpoint"))
        return cls()

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        if self.mode == "off":
            return "off (base model only)"
        if self.mode == "checkpoint":
            return f"{self.run_id}/{self.checkpoint}"
        scope = f"run {self.run_id}" if self.run_id else "the latest run"
        return f"{self.mode} checkpoint of {scope}"


def lora_model_name(base: str) -> str:
    return f"{base}{LORA_SUFFIX}"
