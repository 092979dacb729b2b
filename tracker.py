"""
tracker.py: the optional experiment trackers (--report_to tensorboard | wandb | trackio), each through its own SDK:
every metrics.jsonl record's numbers as scalars at its step, a table of sampled completions, the args as config.

- What is logged is exactly metrics.jsonl: each record's numeric fields (true/false as 1/0; None, as on a
  skipped SFT step, left out) at x = its `step`. The completions are the ones rollouts.jsonl gets, as a table
  every --log_completions_every steps and at the first step a process logs.
- Rank 0 logs; every rank checks the package, so a missing one is the same one-line SetupError on all of
  them, before step 1. None of the SDKs is imported unless asked for: --report_to none changes nothing.
- Where the runs go: tensorboard OUT/tensorboard; wandb dir=OUT (OUT/wandb/...), project --project, else
  $WANDB_PROJECT, else medfact; trackio $TRACKIO_DIR, else OUT/trackio, project --project, $TRACKIO_PROJECT,
  medfact.
- Resume (start > 0) continues the same run: TensorBoard writes to the same folder with purge_step = start + 1,
  so the steps after the checkpoint that a killed run had logged are dropped when read; wandb and trackio
  resume the run whose id (name) OUT/tracker.json keeps. wandb ignores steps it already has: those keep the
  killed run's numbers (the same but for timings: resume is exact). A fresh run (start 0) starts a new run and,
  as it does with metrics.jsonl, empties OUT/tensorboard.
- Closed by the stage at its end; a run that stops before (an error, the step guard) is closed at exit,
  wandb's marked failed.
To add a tracker: its import and install hint in _SDK, a branch in _open, log and close.
"""

import atexit
import importlib
import json
import math
import os
import shutil
import time

from common import SetupError, is_main

# --report_to: the module that must import, and the package that provides it
_SDK = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
        "trackio": ("trackio", "trackio")}


def scalars(rec):
    """The numbers of a metrics.jsonl record, `step` aside: booleans as 0/1, None and text left out."""
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}


def markdown_table(rows):
    """Rows (dicts with the same keys) as one Markdown table: what TensorBoard's text tab shows."""
    cols = list(rows[0])

    def cell(v):
        v = f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else str(v)
        return v.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows])


class Tracker:
    """One run of one tracker, or nothing (--report_to none, ranks other than 0). log(rec, completions) at
    every step, close() at the end."""

    def __init__(self, args, start):
        self.kind, self.out, self.run = args.report_to, args.out, None
        self.every, self.first = getattr(args, "log_completions_every", 0), start + 1
        if self.kind == "none":
            return
        module, package = _SDK[self.kind]
        if self.kind == "trackio":  # trackio reads where its database goes when it is imported
            os.environ.setdefault("TRACKIO_DIR", os.path.join(os.path.abspath(args.out), "trackio"))
        try:
            self.sdk = importlib.import_module(module)
        except ImportError as e:
            raise SetupError(f"--report_to {self.kind}: {package} is not installed ({e}); "
                             f"pip install {package}, or --report_to none") from None
        if is_main():
            self._open(args, start)
            atexit.register(self.close, failed=True)  # a run that stops early still closes

    def _open(self, args, start):
        ids_path = os.path.join(self.out, "tracker.json")
        ids = json.load(open(ids_path)) if start and os.path.exists(ids_path) else {}
        project = args.project or os.environ.get(f"{self.kind.upper()}_PROJECT") or "medfact"
        config, name = vars(args), os.path.basename(os.path.abspath(self.out))  # runs/demo/grpo: "grpo"
        if self.kind == "tensorboard":
            folder = os.path.join(self.out, "tensorboard")
            if not start:  # a fresh run owns OUT: its logs start empty, as metrics.jsonl does
                shutil.rmtree(folder, ignore_errors=True)
            self.run = self.sdk.SummaryWriter(folder, purge_step=start + 1 if start else None)
            self.run.add_text("config", markdown_table([{"flag": k, "value": v} for k, v in config.items()]), start)
            return
        if self.kind == "wandb":
            self.run = self.sdk.init(project=project, dir=self.out, name=name, config=config, id=ids.get("wandb"),
                                     resume="allow")
            ids["wandb"] = self.run.id
        else:  # trackio: a run is known by its name within the project
            name = ids.get("trackio") or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run: a new name
            self.run = self.sdk.init(project=project, name=name, config=config, resume="allow")
            ids["trackio"] = self.run.name
        with open(ids_path, "w") as f:
            json.dump(ids, f)

    def log(self, rec, completions=None):
        """One metrics.jsonl record; `completions` (rollouts.jsonl's records) as a table when it is due."""
        if self.run is None:
            return
        step, values = rec["step"], scalars(rec)
        table = completions if completions and (step == self.first or (self.every and step % self.every == 0)) else None
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.run.add_scalar(k, v, step)
            if table:
                self.run.add_text("completions", markdown_table(table), step)
            self.run.flush()  # a killed run keeps what it logged
            return
        if table:
            columns = list(table[0])
            rows = [[r.get(c) for c in columns] for r in table]
            values["completions"] = (self.sdk.Table(columns=columns, data=rows) if self.kind == "wandb"
                                     else self.sdk.Table(data=table))  # trackio takes its columns from the dicts
        self.run.log(values, step=step)

    def close(self, failed=False):
        if self.run is None:
            return
        atexit.unregister(self.close)
        run, self.run = self.run, None
        if self.kind == "tensorboard":
            run.close()
        elif self.kind == "wandb":
            run.finish(exit_code=1 if failed else 0)
        else:
            run.finish()
