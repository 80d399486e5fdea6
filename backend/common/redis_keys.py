"""Every Redis key headstart writes, with what it holds. Modules build key names only through here.

RQ's own keys (`rq:*`: queues, jobs, registries, workers) are RQ's; headstart's all start with
`headstart:`. P is a Label Studio project id, C a control name, N a version number.
"""

from __future__ import annotations

PREFIX = "headstart"

# --- head versions (backend.core.store) ---------------------------------------------------------


def head_version(project: str, control: str, number: int) -> str:
    """hash {tensors: safetensors bytes, meta: JSON, status, promoted_at, label_snapshot: repeated from meta}: version
    N of P/C, written once, complete."""
    return f"{PREFIX}:head:{project}:{control}:{number}"


def head_counter(project: str, control: str) -> str:
    """integer: the last version number handed out for P/C."""
    return f"{PREFIX}:head:{project}:{control}:next"


def head_current(project: str, control: str) -> str:
    """integer: the version of P/C being served."""
    return f"{PREFIX}:head:{project}:{control}:current"


def head_detailed(project: str, control: str) -> str:
    """set of N: versions of P/C that may still carry per-label detail (backend.core.retention)."""
    return f"{PREFIX}:head:{project}:{control}:detailed"


def head_rejected(project: str, control: str) -> str:
    """set of N: rejected or superseded versions of P/C not deleted yet (backend.core.retention)."""
    return f"{PREFIX}:head:{project}:{control}:rejected"


def head_swept(project: str, control: str) -> str:
    """string: present once the two sets above cover every version of P/C (backend.core.retention)."""
    return f"{PREFIX}:head:{project}:{control}:swept"


def head_controls(project: str) -> str:
    """set of C: the controls of P that have versions."""
    return f"{PREFIX}:heads:{project}"


# --- embeddings (backend.core.embedding_cache) --------------------------------------------------


def embedding(encoder_key: str, digest: str) -> str:
    """float32 bytes: the features of the input whose sha256 is `digest`, under that encoder."""
    return f"{PREFIX}:emb:{encoder_key}:{digest}"


def media_digests(project: str) -> str:
    """hash media URL → sha256 of its content when last fetched (skips refetching known media)."""
    return f"{PREFIX}:media:{project}"


# --- the label mirror (backend.labelstudio.label_mirror) ----------------------------------------


def labels(project: str) -> str:
    """hash annotation id → JSON {task, data, result, ground_truth, cancelled, updated_at}."""
    return f"{PREFIX}:labels:{project}"


def labels_meta(project: str, what: str) -> str:
    """Mirror bookkeeping: `stale` (a counter, bumped whenever the mirror must be fully re-read before training),
    `synced` (fully read from Label Studio once),
    `changes` (counter of webhook writes), `staging` (a resync's copy before it is swapped in), `snapshot` (counter,
    bumped as each training starts reading labels: a version records it, and one read earlier is never promoted
    over it)."""
    return f"{PREFIX}:labels:{project}:{what}"


def label_hints(project: str) -> str:
    """set of `task:ID`, `annotation:ID` (what webhooks said changed) and `check` (START_TRAINING: look for
    changes no webhook announced), for the next training to confirm against Label Studio."""
    return f"{PREFIX}:labels:{project}:hints"


def label_hints_confirming(project: str) -> str:
    """set: the hints a training took to confirm; kept (and retried) until that confirmation is written."""
    return f"{PREFIX}:labels:{project}:hints:confirming"


def label_checked(project: str) -> str:
    """string with a TTL: present while the last look for changes no webhook announced is recent enough."""
    return f"{PREFIX}:labels:{project}:checked"


def label_watermark(project: str) -> str:
    """string: the newest task `updated_at` a full or incremental read of Label Studio has seen."""
    return f"{PREFIX}:labels:{project}:watermark"


def label_read_config(project: str) -> str:
    """string: the labeling config the mirror was last fully read under (a change means a full read)."""
    return f"{PREFIX}:labels:{project}:config"


# --- projects (backend.labelstudio.projects) ----------------------------------------------------


def project(project_id: str) -> str:
    """hash {label_config, seen_at}: what headstart knows of project P."""
    return f"{PREFIX}:project:{project_id}"


PROJECTS = f"{PREFIX}:projects"  # set of every project id seen


def project_deleted(project_id: str) -> str:
    """string, JSON {at, state, message}: a PROJECT_DELETED webhook named P; kept until Label Studio confirms it
    (then P's data is dropped, this too) or it is found to be wrong."""
    return f"{PREFIX}:project-deleted:{project_id}"


def project_data(project_id: str) -> tuple[list[str], list[str]]:
    """(keys, SCAN patterns): everything headstart keeps for project P, except the embeddings (content-addressed,
    shared by projects with the same inputs: `backend.loop.project_data` works out which are P's alone) and the
    shared metrics hash. Used to drop a deleted project's data."""
    keys = [head_controls(project_id), media_digests(project_id), labels(project_id), project(project_id),
            task_index(project_id), embedding_progress(project_id), webhook_auth(project_id), active(project_id),
            input_kills(project_id), project_deleted(project_id)]
    patterns = [f"{PREFIX}:{family}:{project_id}:*" for family in (
        "head", "labels", "train", "tasks", "predicting", "just-written", "predicted", "prediction-pass", "webhook-auth",
        "audit",
        "project")]
    return keys, patterns


# --- training coalescing (backend.common.queues) ------------------------------------------------


def training(project_id: str, what: str) -> str:
    """Per project: `dirty` (a request arrived; its reason), `queued` (the queued job's id),
    `running` (the run lock: the running job's id), `last_start` (time of the last start),
    `recent` (requests within the current window of TRAIN_MIN_INTERVAL_S)."""
    return f"{PREFIX}:train:{project_id}:{what}"


# --- metrics (backend.common.metrics) -----------------------------------------------------------

METRICS = f"{PREFIX}:metrics"  # hash series → value: every counter and histogram sample


# --- the task index (backend.labelstudio.task_index) --------------------------------------------


def task_index(project_id: str) -> str:
    """hash task id → JSON of the task's data: every task of P that Label Studio listed."""
    return f"{PREFIX}:tasks:{project_id}"


def task_index_built(project_id: str) -> str:
    """set once P's tasks were listed completely from Label Studio."""
    return f"{PREFIX}:tasks:{project_id}:built"


def task_index_job(project_id: str) -> str:
    """string, with a TTL: the id of the last job queued to list (and embed) every task of P, or "pending" while
    one is being queued; later requests join it while it is unfinished (backend.common.queues.enqueue_index)."""
    return f"{PREFIX}:tasks:{project_id}:index-job"


# --- predictions written (backend.loop.repredict, backend.server.contract) ----------------------


def predicting(project_id: str, model_version: str) -> str:
    """set of task ids a re-prediction pass has claimed for `model_version` and not written yet (expires): a
    `/predict` for them answers no prediction, so Label Studio does not save a second one."""
    return f"{PREFIX}:predicting:{project_id}:{model_version}"


def just_written(project_id: str, model_version: str) -> str:
    """sorted set: task id -> when a re-prediction pass wrote its `model_version` prediction (the last minutes
    only): a `/predict` whose Label Studio read came before that write answers none for it, too."""
    return f"{PREFIX}:just-written:{project_id}:{model_version}"


def predicted(project_id: str, model_version: str) -> str:
    """set of task ids of P that already carry a prediction of `model_version` in Label Studio."""
    return f"{PREFIX}:predicted:{project_id}:{model_version}"


def prediction_pass_pending(project_id: str) -> str:
    """flag (expires): a pass writing P's served predictions is queued or scheduled and has not started; later
    requests join it (it writes the version served when it starts)."""
    return f"{PREFIX}:prediction-pass:{project_id}:pending"


def prediction_pass_started(project_id: str) -> str:
    """string, a Unix time (expires): when P's last pass writing every unlabeled task's prediction started."""
    return f"{PREFIX}:prediction-pass:{project_id}:started"


def embedding_progress(project_id: str) -> str:
    """hash {total, done, failed}: inputs of P's indexed tasks to embed, embedded, failed (latest pass)."""
    return f"{PREFIX}:embedding:{project_id}"


# --- the project's webhook credentials (backend.labelstudio.webhooks) ---------------------------


def webhook_auth(project_id: str, what: str = "") -> str:
    """hash {state: JSON of the last attempt to give P's webhook the basic-auth header}; with `what`=`claim`:
    string, the credentials tag of the attempt queued or last made (expires, so a later /setup tries again)."""
    return f"{PREFIX}:webhook-auth:{project_id}" + (f":{what}" if what else "")


# --- admin sign-in (backend.admin.auth) ---------------------------------------------------------


def admin_failures(client: str) -> str:
    """integer, expiring: wrong ADMIN_TOKENs from one client address in the current window."""
    return f"{PREFIX}:admin-failures:{client}"


# --- active learning (backend.loop.active_queue) ------------------------------------------------


def active(project_id: str) -> str:
    """hash {sampling, note, tag, strategy, front (JSON task ids), round, refreshed_at, target, target_looked_at}:
    P's queue state."""
    return f"{PREFIX}:active:{project_id}"


def active_refresh_queued(project_id: str) -> str:
    """flag (expires): a job re-ranking P's labeling queue is queued; requests meanwhile join it."""
    return f"{PREFIX}:active-refresh-queued:{project_id}"


# --- inputs that killed workers (backend.loop.poison) -------------------------------------------


def inputs_in_flight(job_id: str) -> str:
    """hash media URL → JSON {project, task_id}: the inputs RQ job `job_id` is fetching or embedding now.
    Left behind only by a worker that died; RQ's abandoned-job handler turns them into kills."""
    return f"{PREFIX}:inflight:{job_id}"


def input_kills(project_id: str) -> str:
    """hash media URL → JSON {task_id, kills, at}: inputs of P that were in flight when a worker died."""
    return f"{PREFIX}:kills:{project_id}"


# --- label audit (backend.loop.audit) -------------------------------------------------------------


def audit(project_id: str, control: str) -> str:
    """string, JSON: the latest audit of control C of P (suspect labels, conflicts, auto-accept, out-of-fold
    probabilities) and the version it was made under."""
    return f"{PREFIX}:audit:{project_id}:{control}"


def audit_markers(project_id: str) -> str:
    """hash "C:task" → JSON {prediction, suggested}: the suspect markers (predictions) written into Label Studio."""
    return f"{PREFIX}:audit:{project_id}:markers"


def audit_queued(project_id: str) -> str:
    """string, with a TTL: an audit of P is queued and has not started yet (later requests coalesce into it)."""
    return f"{PREFIX}:audit:{project_id}:queued"
