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

from refact_lab.finetune.export import FORMATS as EXPORT_FORMATS
from refact_lab.home import Home
from refact_lab.serve import checkpoints, state
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
        return state.load(self.home)[0].lora

    @staticmethod
    def export_path(run_id: str, checkpoint: str, fmt: str = "peft") -> str:
        """The server path that downloads a checkpoint as a .zip (PEFT adapter or merged model, with its card);
        the browser's login cookie authenticates it, as for the app itself."""
        from urllib.parse import urlencode

        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        return "/v1/refact-lab/export?" + urlencode({"run": run_id, "checkpoint": checkpoint, "format": fmt})

    def resolve(self, choice: LoraChoice | None = None) -> checkpoints.Checkpoint | None:
        """What a choice means on disk now (ValueError if it cannot be served)."""
        return checkpoints.resolve(self.home, choice or self.choice())

    def deploy(self, choice: LoraChoice | str, start: bool = True, by: str = "deploy") -> LoraChoice:
        """Save the choice ('best', 'latest', 'off', 'RUN', 'RUN/CHECKPOINT' or a LoraChoice). `start`: start
        the in-process engine when there is no server (the CLI only saves: a running server applies it)."""
        from refact_lab.keep_current.deploys import deploy

        choice = LoraChoice.parse(choice) if isinstance(choice, str) else choice
        # refuses what the engine could not load (with the reason), saves it and records it in the history
        deploy(self.home, choice, by=by)
        if start and hasattr(self.inference, "start"):
            self.inference.start()
        return choice

    def set_context(self, project: str | None = None, tokens: int | None = None) -> state.ServingChoice:
        """Repository context for FIM prompts: a project's index, "off", or "auto" (the deployed run's project);
        `tokens`: its budget. None leaves a value as it is."""
        changes = {}
        if project is not None:
            changes["context"] = None if project == "auto" else project
            if project not in ("auto", state.CONTEXT_OFF) and project not in self.home.projects():
                raise ValueError(f"no project {project!r}; projects: {', '.join(self.home.projects()) or 'none'}")
        if tokens is not None:
            changes["context_tokens"] = tokens
        return state.save(self.home, **changes) if changes else state.load(self.home)[0]

    def summary(self) -> dict:
        """What is deployed now, as settings.json says: the model, the LoRA checkpoint and the context."""
        from refact_lab.context.serving import RepoContext

        choice = state.load(self.home)[0]
        try:
            ck = self.resolve(choice.lora) if choice.lora.mode != "off" else None
        except ValueError as e:
            ck, error = None, str(e)
        else:
            error = None
        from refact_lab.models.registry import resolve

        try:
            spec = resolve(choice.model or "default")
        except ValueError:
            spec = None
        project = RepoContext(self.home).project(choice, ck.run_id if ck else None, spec)
        return {"model": choice.model or "default", "lora": choice.lora.label(),
                "checkpoint": ck.key if ck else None, "lora_error": error,
                "context": project or state.CONTEXT_OFF, "context_choice": choice.context or "auto",
                "context_tokens": choice.context_tokens,
                "context_note": ("auto is off for this model: snippets of other files cost it more than they bring, "
                                 "by its scoreboard (choose a project to turn it on anyway)")
                if choice.context is None and spec is not None and not spec.repo_context
                and choice.context_tokens > 0 else None}

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

    def playground(self, prefix: str, suffix: str = "", max_tokens: int = 32, single_line: bool = False,
                   wait_s: float = 60) -> dict:
        """Complete at the cursor with the base model and, when a LoRA is deployed, the fine-tuned one.

        Waits (up to `wait_s`) until the engine has applied the saved choice, so a completion right after a
        deploy uses what was just deployed, not the adapter before it. `base_ms` / `lora_ms`: wall time of each;
        `snippets`: the repository context in the prompt ({path, text} each).
        """
        snap = self.status()
        if snap.get("state") == "stopped" and hasattr(self.inference, "start"):
            self.inference.start()   # no server: the engine in this process loads on first use, as the note says
            snap = self.status()
        if wait_s and snap.get("state") != "unreachable":
            snap = self.wait_applied(timeout=wait_s)
        models = snap.get("models") or []
        if not models:
            raise InferenceError(f"the model is not ready (state: {snap.get('state')}"
                                 + (f": {snap['error']}" if snap.get("error") else "") + ")")
        base = models[0]
        out = {"base_model": base, "lora_model": None, "base": None, "lora": None, "base_ms": None, "lora_ms": None,
               "snippets": []}
        t0 = time.perf_counter()
        done = self.inference.complete(prefix, suffix, model=base, max_tokens=max_tokens, single_line=single_line)
        out["base_ms"] = (time.perf_counter() - t0) * 1000
        # the repository context both completions saw (the same for both: retrieval does not depend on the adapter)
        out["base"], out["snippets"] = done["text"], done.get("snippets") or []
        if lora_model_name(base) in models:
            out["lora_model"] = lora_model_name(base)
            t0 = time.perf_counter()
            out["lora"] = self.inference.complete(prefix, suffix, model=out["lora_model"], max_tokens=max_tokens,
                                                  single_line=single_line)["text"]
            out["lora_ms"] = (time.perf_counter() - t0) * 1000
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

            spec = resolve(state.load(self.home)[0].model or "default")
            return spec.fim.prompt("{{{prefix}}}", "{{{suffix}}}")
        except ValueError:
            return "<|fim_prefix|>{{{prefix}}}<|fim_suffix|>{{{suffix}}}<|fim_middle|>"
