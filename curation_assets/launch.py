"""Running the project's jobs: launched on the instance as the UI does, or in this process.

:class:`LaunchedRuns` is the path users run. It loads the code location in a code server
(as `dagster dev` does), creates each run from the code server's job snapshot and hands it
to the instance's run launcher, which starts a run worker process that runs the job with
its own executor. A sensor, a schedule, a backfill and the UI's Materialize button end in
that same launch. :class:`InProcessRuns` executes the job in this process instead (for a
debugger, or where no subprocess may start). Both wait for the run and return a
:class:`RunOutcome` with the first failure's message.

A launched run that outlives its job's ``dagster/max_runtime`` tag (the project file's
``runs.*_max_runtime_seconds``) is terminated and marked failed, as the daemon's run
monitoring does under `dagster dev`, so a headless run never waits forever.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget

from curation_assets.assets.project import CODE_LOCATION_MODULE, MAX_RUNTIME_TAG
from curation_assets.config import PROJECTS_ENV, ProjectConfig, ProjectConfigError, project_files

PARTITION_TAG = "dagster/partition"
POLL_SECONDS = 0.2
TERMINATE_GRACE_SECONDS = 15.0  # how long a terminated run worker gets to stop before it is failed


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    success: bool
    message: str = ""  # the first failure's message (empty on success)
    seconds: float = 0.0  # launch (or start) to finish, as this process saw it


class Runs(Protocol):
    """Runs one of the project's jobs and waits for it."""

    def run(
        self,
        job_name: str,
        *,
        partition_key: str | None = None,
        asset_keys: Sequence[dg.AssetKey] | None = None,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunOutcome: ...


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    """The first step failure's message (what dg.Failure said), else the run failure's with the
    chain of causes of its error (where an unreachable broker's address is, say)."""
    records = instance.get_records_for_run(
        run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}
    ).records
    events = [r.event_log_entry.dagster_event for r in records if r.event_log_entry.dagster_event]
    for event in events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            return f"{event.step_key}: {event.step_failure_data.error.message.strip()}"
    for event in events:
        if event.message:
            error, causes = getattr(event.event_specific_data, "error", None), []
            while error is not None:
                text = error.message.strip()
                if text and text not in causes:
                    causes.append(text)
                error = error.cause or error.context
            return " <- ".join([event.message.strip(), *causes])[:2000]
    return f"run {run_id} failed"


class InProcessRuns:
    """Executes jobs in this process (``execute_in_process``) on the given instance."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance):
        self.defs, self.instance = defs, instance

    def run(
        self,
        job_name: str,
        *,
        partition_key: str | None = None,
        asset_keys: Sequence[dg.AssetKey] | None = None,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunOutcome:
        start = time.perf_counter()
        result = self.defs.resolve_job_def(job_name).execute_in_process(
            partition_key=partition_key,
            asset_selection=list(asset_keys) if asset_keys else None,
            instance=self.instance,
            raise_on_error=False,
            tags=dict(tags or {}),
            run_config=dict(run_config or {}),
        )
        message = "" if result.success else failure_message(self.instance, result.run_id)
        return RunOutcome(result.run_id, result.success, message, time.perf_counter() - start)


def serve_project(project: ProjectConfig) -> None:
    """Make the code location load ``project``: its file joins $CURATION_PROJECTS when it is not
    among the project files already (e.g. `curate materialize --project path/to/file.yaml`)."""
    if any(Path(f).resolve() == Path(project.source or "").resolve() for f in project_files()):
        return
    if not project.source or not Path(project.source).is_file():
        raise ProjectConfigError(
            f"project {project.name!r} has no project file a code location could load "
            "(run it in process instead: --in-process)"
        )
    os.environ[PROJECTS_ENV] = os.pathsep.join(filter(None, [os.environ.get(PROJECTS_ENV), project.source]))


@contextmanager
def code_location(
    instance: dg.DagsterInstance, module: str = CODE_LOCATION_MODULE, working_directory: Path | None = None
) -> Iterator[WorkspaceProcessContext]:
    """A code location (default: this project's) loaded in a code server subprocess, as `dagster dev`
    loads it. Its name is the module's.

    The server and the run workers it starts inherit this process's environment, so
    $CURATION_PROJECTS and $CURATION_HOME name the same projects and store here and there.
    """
    target = ModuleTarget(
        module_name=module,
        attribute=None,
        working_directory=str(working_directory or Path.cwd()),
        location_name=module,
    )
    servers: list[subprocess.Popen] = []
    try:
        with WorkspaceProcessContext(instance, target) as workspace:
            # private: the registry hands out no process handles, and a server asked to shut down
            # can stay up waiting on executions it still counts (seen with celery runs)
            registry = getattr(workspace, "_grpc_server_registry", None)
            entry = workspace.create_request_context().get_code_location_entries()[module]
            servers = [p.server_process for p in getattr(registry, "_all_processes", [])]
            if entry.load_error is not None:
                raise RuntimeError(f"code location {module} failed to load:\n{entry.load_error}")
            yield workspace
    finally:
        _stop_servers(servers)


def _stop_servers(servers: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    """Wait for the code servers to exit after their shutdown request; terminate the ones that
    do not, so that no server outlives the caller (or the database its instance points to)."""
    deadline = time.monotonic() + grace_s
    for server in servers:
        try:
            server.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)


@dataclass(frozen=True)
class _JobPlan:
    """What a run of one job and asset selection is created from (the same for every partition)."""

    repo: Any
    job: Any
    plan: Any


class LaunchedRuns:
    """Launches runs through the instance's run launcher, as the UI and the daemon do, and waits."""

    def __init__(self, instance: dg.DagsterInstance, workspace: WorkspaceProcessContext):
        self.instance, self.workspace = instance, workspace
        self.location_name = next(iter(workspace.create_request_context().get_code_location_entries()))
        self._plans: dict[tuple, _JobPlan] = {}

    def run(
        self,
        job_name: str,
        *,
        partition_key: str | None = None,
        asset_keys: Sequence[dg.AssetKey] | None = None,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunOutcome:
        start = time.perf_counter()
        run = self.create_run(job_name, partition_key, asset_keys, run_config, tags)
        self.instance.launch_run(run.run_id, self.workspace.create_request_context())
        return self.wait(run.run_id, start)

    def create_run(
        self,
        job_name: str,
        partition_key: str | None = None,
        asset_keys: Sequence[dg.AssetKey] | None = None,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> dg.DagsterRun:
        """A NOT_STARTED run of ``job_name`` built from the code server's snapshot (what the UI creates)."""
        run_config = dict(run_config or {})
        found = self._job_plan(job_name, frozenset(asset_keys or ()), run_config)
        all_tags = {**found.job.tags, **(tags or {})}
        if partition_key is not None:
            all_tags[PARTITION_TAG] = partition_key
        return self.instance.create_run(
            job_name=job_name,
            run_id=None,
            run_config=run_config,
            resolved_op_selection=found.job.resolved_op_selection,
            step_keys_to_execute=found.plan.step_keys_to_execute,
            op_selection=None,
            status=None,
            root_run_id=None,
            parent_run_id=None,
            tags=all_tags,
            job_snapshot=found.job.job_snapshot,
            execution_plan_snapshot=found.plan,
            parent_job_snapshot=found.job.parent_job_snapshot,
            remote_job_origin=found.job.get_remote_origin(),
            job_code_origin=found.job.get_python_origin(),
            asset_selection=frozenset(asset_keys) if asset_keys else None,
            asset_check_selection=None,
            asset_graph=found.repo.asset_graph,
        )

    def _job_plan(self, job_name: str, asset_keys: frozenset, run_config: dict[str, Any]) -> _JobPlan:
        """The job's snapshot and execution plan from the code server, asked once per job, selection
        and run config: a shard run's plan does not depend on its partition."""
        key = (job_name, asset_keys, repr(sorted(run_config.items())))
        if key not in self._plans:
            location = self.workspace.create_request_context().get_code_location(self.location_name)
            repo = location.get_repository(next(iter(location.get_repository_names())))
            selector = JobSubsetSelector(
                location_name=self.location_name,
                repository_name=repo.name,
                job_name=job_name,
                op_selection=None,
                asset_selection=asset_keys or None,
            )
            job = location.get_job(selector)
            plan = location.get_execution_plan(
                job, run_config, step_keys_to_execute=None, known_state=None, instance=self.instance
            ).execution_plan_snapshot
            self._plans[key] = _JobPlan(repo, job, plan)
        return self._plans[key]

    def wait(self, run_id: str, start: float | None = None) -> RunOutcome:
        """Wait for a launched run; past its max runtime, terminate it and mark it failed."""
        start = time.perf_counter() if start is None else start
        limit = float(self.instance.get_run_by_id(run_id).tags.get(MAX_RUNTIME_TAG) or 0)
        while True:
            run = self.instance.get_run_by_id(run_id)
            if run.is_finished:
                success = run.status == dg.DagsterRunStatus.SUCCESS
                message = "" if success else failure_message(self.instance, run_id)
                return RunOutcome(run_id, success, message, time.perf_counter() - start)
            if limit and time.perf_counter() - start > limit:
                return self._stop(run, limit, start)
            time.sleep(POLL_SECONDS)

    def _stop(self, run: dg.DagsterRun, limit: float, start: float) -> RunOutcome:
        """Terminate a run past its limit and mark it failed, as the daemon's run monitoring does."""
        message = f"exceeded the maximum runtime of {limit:.0f} s (the dagster/max_runtime tag): terminated"
        self.instance.report_run_canceling(run, message=message)
        self.instance.run_launcher.terminate(run.run_id)
        deadline = time.perf_counter() + TERMINATE_GRACE_SECONDS
        while not self.instance.get_run_by_id(run.run_id).is_finished and time.perf_counter() < deadline:
            time.sleep(POLL_SECONDS)
        # A worker that honoured the termination marked the run canceled; either way it failed.
        if self.instance.get_run_by_id(run.run_id).status != dg.DagsterRunStatus.FAILURE:
            self.instance.report_run_failed(self.instance.get_run_by_id(run.run_id), message)
        return RunOutcome(run.run_id, False, message, time.perf_counter() - start)
