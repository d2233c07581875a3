"""The scoreboard view: base model vs each evaluated checkpoint of a run, per kind of cursor, and the cursors
where the fine-tune gained and lost most, side by side with the expected text.

A view over `refact_lab.scoreboard.service.ScoreboardService`: it reads the run's stored eval.json (nothing is
recomputed to show it) and its "Evaluate best checkpoint" button starts the service's background job. Embedded
in the Fine-tune panel under the loss plot, following the run selected there (`follow`, a widget whose value is
a run id).
"""

from __future__ import annotations

import base64
import html
import io

import ipywidgets as w

METRICS = ("edit_similarity", "exact_match", "identifier_f1", "named_right", "degenerate")


class ScoreboardPanel:
    """`ScoreboardPanel(ScoreboardService(home), follow=runs_select).widget`."""

    def __init__(self, service, *, follow=None, run_id: str | None = None):
        self.service = service
        self.run_id = run_id
        self.metric = w.Dropdown(options=METRICS, value="edit_similarity", description="Metric",
                                 layout=w.Layout(width="280px"))
        self.checkpoint = w.Dropdown(options=[], description="Samples of", layout=w.Layout(width="380px"))
        self.cursors = w.BoundedIntText(value=50, min=1, max=5000, description="Cursors",
                                        tooltip="How many held-out cursors to complete", layout=w.Layout(width="180px"))
        self.evaluate_button = w.Button(description="Evaluate best checkpoint", icon="check",
                                        layout=w.Layout(width="220px"))
        self.refresh_button = w.Button(description="Refresh", icon="refresh", layout=w.Layout(width="110px"))
        self.summary = w.HTML()
        self.summary.add_class("refact-lab-scoreboard-summary")
        self.chart = w.Output(layout=w.Layout(min_height="260px"))
        self.chart.add_class("refact-lab-scoreboard-chart")
        self.samples = w.HTML()
        self.samples.add_class("refact-lab-scoreboard-samples")
        self.message = w.HTML()
        self.metric.observe(lambda _: self.refresh(), "value")
        self.checkpoint.observe(lambda _: self._show_samples(), "value")
        self.evaluate_button.on_click(lambda _: self.evaluate())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.widget = w.VBox([w.HTML("<b>Scoreboard</b> <span style='color:#777'>(completions at seeded cursors "
                                     "of the held-out files, through the served engine)</span>"),
                              w.HBox([self.metric, self.cursors, self.evaluate_button, self.refresh_button]),
                              self.message, self.summary, self.chart, self.checkpoint, self.samples])
        self.widget.add_class("refact-lab-scoreboard")
        self._follow = follow
        if follow is not None:
            follow.observe(lambda change: self.show(change["new"]), "value")
            self.run_id = follow.value or run_id
        self.refresh()

    def show(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.refresh()

    def evaluate(self) -> None:
        if not self.run_id:
            self.message.value = "<span style='color:#b00'>select a run first</span>"
            return
        try:
            self.service.start(self.run_id, int(self.cursors.value))
        except RuntimeError as e:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        self.message.value = (f"evaluating {html.escape(self.run_id)} over {self.cursors.value} cursors "
                              "(press Refresh to see progress)")

    def refresh(self) -> None:
        job = self.service.job()
        if job["state"] == "running":
            self.message.value = f"evaluating {html.escape(str(job['run_id']))}: {job['done']}/{job['total']} cursors"
        elif job["state"] == "failed":
            self.message.value = f"<span style='color:#b00'>evaluation failed: {html.escape(str(job['error']))}</span>"
        try:
            doc = self.service.scoreboard(self.run_id) if self.run_id else None
            damaged = None
        except ValueError as e:
            doc, damaged = None, str(e)
        if not doc:
            self.summary.value = "<i>not evaluated yet</i>" if damaged is None else (
                f"<span style='color:#b00'>{html.escape(damaged)}; Evaluate replaces it</span>")
            self.chart.outputs = ()
            self.checkpoint.options = []
            self.samples.value = ""
            return
        rows = "".join(f"<tr><td>{html.escape(m['name'])}</td>"
                       + "".join(f"<td style='text-align:right'>{m['overall'][k]:.3f}</td>" for k in METRICS)
                       + f"<td style='text-align:right'>{m['overall']['p50_ms']:.0f}</td></tr>"
                       for m in doc["models"])
        self.summary.value = (f"{doc['cursors']} cursors · <table><tr><th>model</th>"
                              + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in METRICS)
                              + f"<th>p50 ms</th></tr>{rows}</table>")
        self._draw(doc)
        tuned = [m["lora"] for m in doc["models"] if m["lora"]]
        if list(self.checkpoint.options) != tuned:
            keep = self.checkpoint.value
            self.checkpoint.options = tuned
            self.checkpoint.value = keep if keep in tuned else (tuned[-1] if tuned else None)
        self._show_samples()

    def _draw(self, doc: dict) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        metric = self.metric.value
        models = doc["models"]
        kinds = list(models[0]["by_kind"])
        fig = Figure(figsize=(7.5, 3.0), dpi=90)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            values = [m["by_kind"][k][metric] or 0.0 for k in kinds]
            ax.bar([x + i * width for x in range(len(kinds))], values, width,
                   label="base (LoRA off)" if m["lora"] is None else m["lora"])
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(kinds))])
        ax.set_xticklabels([k.replace("_", " ") for k in kinds], fontsize=8)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.chart.outputs = ({"output_type": "display_data", "metadata": {},
                               "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                        "text/plain": f"scoreboard of {self.run_id} by {metric}"}},)

    def _show_samples(self) -> None:
        lora = self.checkpoint.value
        if not lora or not self.run_id:
            self.samples.value = ""
            return
        s = self.service.samples(self.run_id, lora)

        def table(title: str, rows: list[dict], css: str) -> str:
            if not rows:
                return f"<p><b>{title}</b>: none</p>"
            cells = "".join(
                f"<tr><td>{html.escape(r['kind'])}<br><small>{html.escape(r['file'])}:{r['line']}</small></td>"
                f"<td><pre>{html.escape(r['prefix'][-160:])}</pre></td><td><pre>{html.escape(r['expected'])}</pre></td>"
                f"<td><pre>{html.escape(r['base'])}</pre></td><td><pre>{html.escape(r['tuned'])}</pre></td>"
                f"<td>{r['delta']:+.2f}</td></tr>" for r in rows)
            return (f"<p><b>{title}</b></p><table class='{css}'><tr><th>cursor</th><th>code before</th>"
                    "<th>expected</th><th>base</th><th>fine-tuned</th><th>edit sim Δ</th></tr>" + cells + "</table>")

        self.samples.value = (table("Gained most", s["gained"], "refact-lab-gained")
                              + table("Lost most", s["lost"], "refact-lab-lost"))
