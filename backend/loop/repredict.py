"""Keep every unlabeled task carrying the served version's prediction, from cached features.

After a promotion, the unlabeled tasks of the task index get the new version's prediction in one
vectorized pass over their cached features (a matrix product per control) and bulk writes to Label
Studio. Tasks whose inputs were never embedded are left to the embedding chunks, which write the
predictions of what they embedded every few seconds and when the project's pass ends. A task gets at most one prediction per version: the ledger remembers
what was written (by this pass, by a chunk, or by Label Studio saving a `/predict` answer). The
pass yields to a waiting training between write batches, and a newer promotion supersedes it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from redis import Redis

from backend.common import redis_keys
from backend.labelstudio.prediction_writes import write_predictions
from backend.loop.services import Services

log = logging.getLogger(__name__)

# predictions per import request. Label Studio 1.23.2's import (data_import/api.py ImportPredictionsAPI, the
# path its feature flag leaves on) recounts the counters of *every task of the project* after each request, so a
# request costs about the same whether it carries 200 predictions or 5,000 (measured: ~2.3 s at 5,000 tasks for
# 200, 1,000 or 2,500 predictions; ~0.45 ms per project task). Fewer, larger requests write a pass in seconds and
# hold its SQLite database locked for the fewest periods; a training waits behind at most one request.
WRITE_BATCH = 5000
LEDGER_TTL_S = 30 * 24 * 3600
WRITING_TTL_S = 300  # a pass that died mid-write stops holding /predict's answers back after this
# a task a pass has just written is held back from /predict this long: Label Studio's "Retrieve Predictions" picks
# the tasks without the version's prediction, then waits for /predict (up to PREDICT_DEADLINE_S, 60 s by default);
# a pass that writes in between would otherwise leave it saving a second prediction of the version
JUST_WRITTEN_HOLD_S = 120.0


class PredictionLedger:
    """Which tasks already carry a prediction of a version in Label Studio."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def unwritten(self, project: str, model_version: str, task_ids: list[int]) -> list[int]:
        if not task_ids:
            return []
        written = self.redis.smismember(redis_keys.predicted(project, model_version), task_ids)
        return [task for task, done in zip(task_ids, written) if not done]

    def claim(self, project: str, model_version: str, task_ids: list[int]) -> list[int]:
        """Mark these tasks as getting `model_version`'s prediction from this pass and return those no one had
        marked: of two passes (two workers) over the same tasks, each task goes to one. Until `written` or
        `release`d they are also *being written*: a `/predict` for them answers none (`answer`). One atomic step,
        so no `/predict` sees a task claimed and not yet marked as being written (it would answer it too)."""
        if not task_ids:
            return []
        claimed = self.redis.eval(CLAIM_SCRIPT, 2, redis_keys.predicted(project, model_version),
                                  redis_keys.predicting(project, model_version), LEDGER_TTL_S, WRITING_TTL_S,
                                  *task_ids)
        return [int(task) for task in claimed]

    def written(self, project: str, model_version: str, task_ids: list[int]) -> None:
        """These tasks now carry the version's prediction; they stay held back from /predict for JUST_WRITTEN_HOLD_S."""
        if task_ids:
            now, recent = time.time(), redis_keys.just_written(project, model_version)
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(redis_keys.predicting(project, model_version), *task_ids)
            pipe.zadd(recent, {task: now for task in task_ids})
            pipe.zremrangebyscore(recent, "-inf", now - JUST_WRITTEN_HOLD_S)
            pipe.expire(recent, int(JUST_WRITTEN_HOLD_S) + 1)
            pipe.execute()

    def release(self, project: str, model_version: str, task_ids: list[int]) -> None:
        if task_ids:
            self.redis.srem(redis_keys.predicted(project, model_version), *task_ids)
            self.redis.srem(redis_keys.predicting(project, model_version), *task_ids)

    def answer(self, project: str, model_version: str, task_ids: list[int]) -> set[int]:
        """`/predict` is answering these tasks with `model_version`: record them (Label Studio saves the answers, so
        no pass writes them again) and return those to hold back instead, in one atomic step. Held back: tasks a
        re-prediction pass is writing now, or wrote within JUST_WRITTEN_HOLD_S (Label Studio may have picked them
        before it saw that write); answering those would leave Label Studio with two predictions of the version."""
        if not task_ids:
            return set()
        held = self.redis.eval(ANSWER_SCRIPT, 3, redis_keys.predicted(project, model_version),
                               redis_keys.predicting(project, model_version),
                               redis_keys.just_written(project, model_version),
                               time.time() - JUST_WRITTEN_HOLD_S, LEDGER_TTL_S, *task_ids)
        return {int(task) for task in held}


# KEYS: predicted, predicting; ARGV: the ledger's TTL, the being-written TTL, the task ids. A task newly added to
# `predicted` is this pass's, and marked as being written in the same step.
CLAIM_SCRIPT = """
local claimed = {}
for index = 3, #ARGV do
  local task = ARGV[index]
  if redis.call('SADD', KEYS[1], task) == 1 then
    redis.call('SADD', KEYS[2], task)
    table.insert(claimed, task)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if #claimed > 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return claimed
"""

# KEYS: predicted, predicting, just written; ARGV: the hold's start (epoch s), the ledger's TTL, the task ids.
# A task newly added to `predicted` is this answer's alone (a pass's `claim` skips it); one already there is held back
# while a pass is writing it or has just written it.
ANSWER_SCRIPT = """
local held = {}
for index = 3, #ARGV do
  local task = ARGV[index]
  if redis.call('SADD', KEYS[1], task) == 0 then
    local written_at = redis.call('ZSCORE', KEYS[3], task)
    if redis.call('SISMEMBER', KEYS[2], task) == 1 or (written_at and tonumber(written_at) >= tonumber(ARGV[1])) then
      table.insert(held, task)
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return held
"""


def unlabeled_task_ids(services: Services, project: str) -> list[int]:
    """Indexed tasks without a (non-cancelled) annotation in the label mirror."""
    labeled = services.labels.labeled_tasks(project)
    return sorted(task for task in services.tasks.data(project) if task not in labeled)


def served_version(services: Services, project: str) -> str | None:
    """The model_version served now, or None when the project has no config, or neither a head nor zero-shot
    pre-labels (`<control>-v0`, written for the unlabeled tasks as their features are cached) yet."""
    config = services.projects.label_config(project)
    if config is None:
        return None
    served = services.predictor.served(project, config)
    return served.model_version if served.anything else None


def repredict(services: Services, project: str, model_version: str, task_ids: list[int] | None = None, *,
              should_yield: Callable[[], bool] = lambda: False) -> dict:
    """Write `model_version`'s prediction for the unlabeled tasks (or those of `task_ids` still unlabeled).

    Returns a summary; `remaining` lists the tasks left when it yielded to a training (queue them again).
    """
    if served_version(services, project) != model_version:
        return {"project": project, "status": f"skipped: {model_version} is no longer current"}
    config = services.projects.label_config(project)
    unlabeled = unlabeled_task_ids(services, project)
    if task_ids is not None:
        wanted = set(task_ids)
        unlabeled = [task for task in unlabeled if task in wanted]
    ledger = PredictionLedger(services.redis)
    # predicted first, claimed second: a task whose inputs are not embedded yet is never claimed, so `/predict`
    # keeps answering for it while this pass writes the others
    data = services.tasks.data(project, ledger.unwritten(project, model_version, unlabeled))
    tasks = [{"id": task, "data": task_data} for task, task_data in data.items()]
    predictions, not_embedded = services.predictor.predict_cached(tasks, project=project, label_config=config)
    payload = {task["id"]: {"task": task["id"], "result": prediction["result"], "score": prediction["score"],
                            "model_version": prediction["model_version"]}
               for task, prediction in zip(tasks, predictions)
               if prediction["result"] and prediction["model_version"] == model_version}
    todo = ledger.claim(project, model_version, sorted(payload))
    unwritten = set(todo)  # claimed, and released again unless written
    try:
        return _write(services, project, model_version, [payload[task] for task in todo], len(not_embedded),
                      ledger, unwritten, should_yield)
    finally:
        ledger.release(project, model_version, sorted(unwritten))


def _write(services: Services, project: str, model_version: str, payload: list[dict], not_embedded: int,
           ledger: PredictionLedger, unwritten: set[int], should_yield: Callable[[], bool]) -> dict:
    """Import the claimed tasks' predictions in batches; what is written leaves `unwritten`."""
    written, client, project_tasks = 0, None, services.tasks.count(project)
    for start in range(0, len(payload), WRITE_BATCH):
        if start and (should_yield() or served_version(services, project) != model_version):
            remaining = [item["task"] for item in payload[start:]]
            return {"project": project, "model_version": model_version, "predictions": written,
                    "not_embedded": not_embedded, "remaining": remaining}
        batch = payload[start:start + WRITE_BATCH]
        client = client or services.label_studio()
        write_predictions(client, int(project), batch, project_tasks=project_tasks)
        unwritten.difference_update(item["task"] for item in batch)
        ledger.written(project, model_version, [item["task"] for item in batch])
        written += len(batch)
    log.info("project %s: wrote %d predictions of %s (%d tasks not embedded yet)",
             project, written, model_version, not_embedded)
    return {"project": project, "model_version": model_version, "tasks": len(payload), "predictions": written,
            "not_embedded": not_embedded, "remaining": []}
