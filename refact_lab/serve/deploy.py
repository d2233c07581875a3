"""Deploy as a service: choose the LoRA checkpoint the server offers, try it, and connect an IDE to it.

`deploy(choice)` saves the choice in settings.json; the server's engine loads that adapter between decoding
steps, without a restart, and requests already running finish on the adapter they started with (see
`refact_lab.serve.state`). `wait_applied()` waits until the engine reports the choice applied.
The playground completes the same cursor with the base model and with "<base>:lora" side by side.
`connection()` gives the inference URL, the token and ready-to-paste settings for the Refact plugin, Continue
and Tabby.
"""

from __future__ import annotations

import json
import os
import time

from refact_lab.home import Home
from refact_lab.serve import checkpoints
from refact_lab.serve.client import InferenceError, default_inference
from refact_lab.serve.state import LoraChoice, lora_model_name


class DeployService:
    def __init__(self, home: Home, inference=None, url: str | None = None, token: str | None = None):
        self.home = home
        self.inference = inference if inference is not None else default_inference(home)
        self.url = (url or os.environ.get("REFACT_LAB_URL") or "http://127.0.0.1:8008").rstrip("/")
        self.token = token if token is not None else os.environ.get("REFACT_LAB_TOKEN", "")

    # ---- checkpoints and the choice ------------------------------------------------------------------------

    def runs(self) -> list[checkpoints.Run]:
        return checkpoints.list_runs(self.home)

    def choice(self) -> LoraChoice:
        return LoraChoice.from_settings(self.home.load_settings())

    def resolve(self, choice: LoraChoice | None = None) -> checkpoints.Checkpoint | None:
        """What a choice means on disk now (ValueError if it cannot be served)."""
        return checkpoints.resolve(self.home, choice or self.choice())

    def deploy(self, choice: LoraChoice | str) -> LoraChoice:
        """Save the choice ('best', 'latest', 'off', 'RUN', 'RUN/CHECKPOINT' or a LoraChoice)."""
        choice = LoraChoice.parse(choice) if isinstance(choice, str) else choice
        if choice.mode != "off":
            self.resolve(choice)  # refuse now what the engine could not load, with the reason
        self.home.update_settings(lora=choice.to_dict())
        if hasattr(self.inference, "start"):
            self.inference.start()
        return choice

    def status(self) -> dict:
        try:
            return self.inference.status()
        except InferenceError as e:
            return {"state": "unreachable", "error": str(e), "models": [], "lora": None}

    def wait_applied(self, timeout: float = 60, poll: float = 0.2) -> dict:
        """Wait until the engine has resolved the saved choice; returns its status (lora.deployed, caps_version)."""
        wanted = self.choice().to_dict()
        deadline = time.monotonic() + timeout
        snap = self.status()
        while time.monotonic() < deadline:
            snap = self.status()
            lora = snap.get("lora") or {}
            if snap.get("state") in ("ready", "failed") and lora.get("applied") == wanted:
                return snap
            time.sleep(poll)
        return snap

    # ---- the playground ------------------------------------------------------------------------------------

    def playground(self, prefix: str, suffix: str = "", max_tokens: int = 32, single_line: bool = False) -> dict:
        """Complete at the cursor with the base model and, when a LoRA is deployed, the fine-tuned one."""
        snap = self.status()
        models = snap.get("models") or []
        if not models:
            raise InferenceError(f"the model is not ready (state: {snap.get('state')}"
                                 + (f": {snap['error']}" if snap.get("error") else "") + ")")
        base = models[0]
        out = {"base_model": base, "lora_model": None, "base": None, "lora": None}
        out["base"] = self.inference.complete(prefix, suffix, model=base, max_tokens=max_tokens,
                                              single_line=single_line)["text"]
        if lora_model_name(base) in models:
            out["lora_model"] = lora_model_name(base)
            out["lora"] = self.inference.complete(prefix, suffix, model=out["lora_model"], max_tokens=max_tokens,
                                                  single_line=single_line)["text"]
        return out

    # ---- connecting an IDE ---------------------------------------------------------------------------------

    def connection(self, snap: dict | None = None) -> dict:
        """The inference URL, the token, and settings to paste into each IDE plugin."""
        snap = snap if snap is not None else self.status()
        models = snap.get("models") or []
        model = models[-1] if models else "default"
        fim = self._fim_template()
        token = self.token or "<no token: server started with --no-auth>"
        refact = json.dumps({"refactai.addressURL": self.url, "refactai.apiKey": token}, indent=2)
        cont = "\n".join([
            "# ~/.continue/config.yaml",
            "models:",
            "  - name: refact_lab",
            "    provider: openai",
            f"    model: {model}",
            f"    apiBase: {self.url}/v1",
            f"    apiKey: {token}",
            "    roles: [autocomplete]",
            "    useLegacyCompletionsEndpoint: true",
            "    promptTemplates:",
            f"      autocomplete: {json.dumps(fim)}",
        ])
        tabby = "\n".join([
            "# ~/.tabby-client/agent/config.toml",
            "[server]",
            f'endpoint = "{self.url}"',
            f'token = "{token}"',
        ])
        return {"url": self.url, "api_base": f"{self.url}/v1", "token": self.token, "model": model,
                "refact": refact, "continue": cont, "tabby": tabby}

    def _fim_template(self) -> str:
        try:
            from refact_lab.models.registry import resolve

            spec = resolve(self.home.load_settings().get("model") or "default")
            return spec.fim.prompt("{{{prefix}}}", "{{{suffix}}}")
        except ValueError:
            return "<|fim_prefix|>{{{prefix}}}<|fim_suffix|>{{{suffix}}}<|fim_middle|>"
