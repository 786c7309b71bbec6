"""Answer tasks: ``yesno`` (POPE) and ``open`` (VQA-style short answers); see ``vrp.tasks.base``."""

from __future__ import annotations

from typing import Any

from vrp.tasks.base import Gold, Task, TaskError
from vrp.tasks.open import OpenTask
from vrp.tasks.vqa import CORRECT_RULES, DEFAULT_CORRECT_RULE
from vrp.tasks.yesno import YesNoTask

TASKS: dict[str, type[Task]] = {"yesno": YesNoTask, "open": OpenTask}

__all__ = [
    "CORRECT_RULES",
    "DEFAULT_CORRECT_RULE",
    "TASKS",
    "Gold",
    "Task",
    "TaskError",
    "get_task",
    "task_of_run",
]


def get_task(name: str, *, correct_rule: str = DEFAULT_CORRECT_RULE) -> Task:
    """The task called `name`; `correct_rule` applies to tasks scored against human answers."""
    if name == "open":
        return OpenTask(correct_rule)
    if name in TASKS:
        return TASKS[name]()
    raise TaskError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def task_of_run(config: dict[str, Any]) -> Task:
    """The task a run was ingested with, from its ``runs.config`` (runs from before tasks: yes/no)."""
    identity = config.get("task") or {"task": "yesno"}
    return get_task(identity["task"], correct_rule=identity.get("correct_rule", DEFAULT_CORRECT_RULE))
