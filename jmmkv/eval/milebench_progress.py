"""Progress files of `jmmkv.eval.milebench` runs: the finished tasks of a run, kept so that an
interrupted run can resume (``jmmkv eval milebench --resume``) and refused when they come from a
run with other settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def _plain(x):
  """``x`` as JSON gives it back (tuples become lists), so settings compare equal after a file."""
  return json.loads(json.dumps(x, default=str))


def default_settings(model, tasks: list, policy, budget, **options) -> dict:
  """What determines `evaluate`'s results when its caller names nothing else: the policy class
  and hyperparameters, the budget, the model path and dtype, the task names and sample ids, and
  ``options`` (max_new_tokens, max_context_len, chat_template)."""
  return _plain(
    {
      "policy": type(policy).__name__,
      "hyperparameters": dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else {},
      "budget": dataclasses.asdict(budget) if dataclasses.is_dataclass(budget) else budget,
      "model": model.path,
      "dtype": model.dtype_name,
      "samples": {t.name: [s.sample_id for s in t.samples] for t in tasks},
      **options,
    }
  )


def _is_progress(saved) -> bool:
  if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
    return False
  tasks = saved.get("tasks")
  return isinstance(tasks, dict) and all(
    isinstance(t, dict) and isinstance(t.get("predictions"), list) and "seconds" in t
    for t in tasks.values()
  )


def read_progress(path: Path, settings: dict) -> dict:
  """Finished tasks in the progress file ``path`` (task -> {"seconds", "predictions"}); {} if it
  does not exist. A file that is not one, or was written with other ``settings``, is refused."""
  path = Path(path)
  if not path.exists():
    return {}
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"progress file {path} is not valid JSON ({e}); delete it to start over")
  if not _is_progress(saved):
    raise ValueError(f"{path} is not a MileBench progress file; delete it to start over")
  old, new, unset = saved["settings"], _plain(settings), "(unset)"
  for key in list(new) + [k for k in old if k not in new]:
    if old.get(key, unset) != new.get(key, unset):
      raise ValueError(
        f"progress file {path} is from a run with other settings: {key} was "
        f"{old.get(key, unset)!r}, now {new.get(key, unset)!r}; rerun with the same settings "
        "or delete the file"
      )
  return saved["tasks"]


def refuse_progress(path: Path, how: str = "resume=True") -> None:
  """Refuses to start over a run whose progress file ``path`` exists; ``how`` says how to resume
  it instead."""
  if Path(path).exists():
    raise ValueError(
      f"{path} holds the progress of an interrupted run: pass {how} to continue it, or delete "
      "the file to start over"
    )


def progress_path(out) -> Path:
  """The progress file of a run writing ``out``: ``<out>.partial.json`` beside it."""
  out = Path(out)
  return out.with_name(out.name + ".partial.json")
