"""MileBench on disk: the task list, its categories, and the loader of ``<DATA>/<Task>/<Task>.json``.

Layout (as MileBench's ``generate.py`` reads it): one directory per task, holding ``<Task>.json``
and ``images/``. The JSON is ``{"meta_data": {"task_instruction": [...], "question_type":
"multi-choice" | "open-ended", ...}, "data": [sample, ...]}``; a sample is ``{"sample_id",
"task_instruction_id", "task_instance": {"context", "images_path", ["choice_list"]}, "response",
"image_quantity_level"}``. The task names and categories are the 29 of MileBench's ``eval.sh`` and
``score.py``: realistic temporal (T), realistic semantic (S), and the diagnostic needle in a
haystack (NH) and image retrieval (IR) tasks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CATEGORIES = {
  "T": (
    "ActionLocalization",
    "ActionPrediction",
    "ActionSequence",
    "CharacterOrder",
    "CounterfactualInference",
    "EgocentricNavigation",
    "MovingAttribute",
    "MovingDirection",
    "ObjectExistence",
    "ObjectInteraction",
    "ObjectShuffle",
    "SceneTransition",
    "StateChange",
  ),
  "S": (
    "ALFRED",
    "CLEVR-Change",
    "DocVQA",
    "IEdit",
    "MMCoQA",
    "MultiModalQA",
    "nuscenes",
    "OCR-VQA",
    "SlideVQA",
    "Spot-the-Diff",
    "TQA",
    "WebQA",
    "WikiVQA",
  ),
  "NH": ("TextNeedleInAHaystack", "ImageNeedleInAHaystack"),
  "IR": ("GPR1200",),
}
CATEGORY_NAMES = {
  "T": "temporal",
  "S": "semantic",
  "NH": "needle in a haystack",
  "IR": "image retrieval",
}
TASKS = tuple(t for names in CATEGORIES.values() for t in names)
LEVELS = ("Few", "Medium", "Many")
QUESTION_TYPES = ("multi-choice", "open-ended")


def category_of(task: str) -> str:
  return next(c for c, names in CATEGORIES.items() if task in names)


def level_of(n_images: int) -> str:
  """Image-quantity level from an image count, for samples without ``image_quantity_level``:
  Few <= 5 < Medium <= 31 < Many (the paper's ranges; MileBench's JSON states the level)."""
  return "Few" if n_images <= 5 else "Medium" if n_images <= 31 else "Many"


@dataclasses.dataclass(frozen=True)
class Sample:
  sample_id: int | str
  instruction: str  # meta_data.task_instruction[task_instruction_id]
  context: str  # with "{image#k}" / "{table#k}" placeholders
  images: tuple[str, ...]  # file names under the task's images/ directory
  choices: tuple[str, ...] | None
  response: str
  level: str  # Few / Medium / Many


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  question_type: str
  image_dir: Path
  samples: tuple[Sample, ...]

  @property
  def category(self) -> str:
    return category_of(self.name)


def resolve_tasks(spec: str | None, data_dir: Path) -> list[str]:
  """Task names from ``--tasks``: comma-separated names (case-insensitive) or categories (T, S,
  NH, IR: those of its tasks found under ``data_dir``); without one, every task found there."""
  if not data_dir.is_dir():
    raise FileNotFoundError(f"MileBench data directory {data_dir} does not exist")
  if not spec:
    found = [t for t in TASKS if (data_dir / t / f"{t}.json").is_file()]
    if not found:
      raise FileNotFoundError(
        f"no MileBench task under {data_dir} (expected e.g. {data_dir / 'ALFRED' / 'ALFRED.json'})"
      )
    return found
  by_lower = {t.lower(): t for t in TASKS}
  names: list[str] = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    if item.upper() in CATEGORIES:  # a category: those of its tasks that are on disk
      present = [t for t in CATEGORIES[item.upper()] if (data_dir / t / f"{t}.json").is_file()]
      if not present:
        raise FileNotFoundError(f"no task of category {item.upper()} under {data_dir}")
      names += [t for t in present if t not in names]
    elif item.lower() in by_lower:
      names += [by_lower[item.lower()]] if by_lower[item.lower()] not in names else []
    else:
      raise ValueError(
        f"unknown MileBench task {item!r}; tasks: {', '.join(TASKS)} (or a category: T, S, NH, IR)"
      )
  if not names:
    raise ValueError("--tasks names no task")
  return names


def _field(obj, key: str, where: str):
  if not isinstance(obj, dict) or key not in obj:
    raise ValueError(f"{where} has no {key!r} field")
  return obj[key]


def _sample(raw, i: int, instructions: list, where: str) -> Sample:
  where = f"{where} sample {i}"
  inst = _field(raw, "task_instance", where)
  images = _field(inst, "images_path", where)
  iid = _field(raw, "task_instruction_id", where)
  if not isinstance(iid, int) or not 0 <= iid < len(instructions):
    raise ValueError(f"{where}: task_instruction_id {iid!r} is not an index of task_instruction")
  choices = inst.get("choice_list")
  level = raw.get("image_quantity_level") or level_of(len(images))
  if level not in LEVELS:
    raise ValueError(f"{where}: image_quantity_level {level!r} is not one of {', '.join(LEVELS)}")
  return Sample(
    sample_id=_field(raw, "sample_id", where),
    instruction=str(instructions[iid]),
    context=str(_field(inst, "context", where)),
    images=tuple(str(p) for p in images),
    choices=None if choices is None else tuple(str(c) for c in choices),
    response=str(_field(raw, "response", where)),
    level=level,
  )


def load_task(data_dir: Path, name: str, limit: int | None = None) -> Task:
  """Reads ``data_dir/name/name.json`` (its first ``limit`` samples) and checks its fields."""
  from jmmkv.eval.milebench_metrics import normalize

  path = data_dir / name / f"{name}.json"
  if not path.is_file():
    raise FileNotFoundError(f"MileBench task {name}: {path} does not exist")
  try:
    core = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None
  meta = _field(core, "meta_data", str(path))
  instructions = _field(meta, "task_instruction", f"{path} meta_data")
  qtype = _field(meta, "question_type", f"{path} meta_data")
  if qtype not in QUESTION_TYPES:
    raise ValueError(f"{path}: question_type {qtype!r} is not one of {', '.join(QUESTION_TYPES)}")
  raw = _field(core, "data", str(path))
  if not isinstance(raw, list):
    raise ValueError(f"{path}: 'data' is not a list of samples")
  samples = tuple(_sample(s, i, instructions, str(path)) for i, s in enumerate(raw[:limit]))
  for s in samples:
    if qtype == "multi-choice" and (
      s.choices is None or normalize(s.response) not in [normalize(c) for c in s.choices]
    ):
      raise ValueError(f"{path} sample {s.sample_id}: the response is not in its choice_list")
  return Task(name, qtype, data_dir / name / "images", samples)


def check_images(tasks: list[Task]) -> None:
  """Fails on the first image file that does not exist (before any model is loaded)."""
  for task in tasks:
    for s in task.samples:
      for p in s.images:
        if not (task.image_dir / p).is_file():
          raise FileNotFoundError(
            f"image {task.image_dir / p} does not exist (task {task.name}, sample {s.sample_id})"
          )
