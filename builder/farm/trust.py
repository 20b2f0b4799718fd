"""What a worker takes from Redis is data, and only bake's build runs.

Whoever can write to the farm's Redis can put anything on the queue. RQ's default
serializer is pickle, and unpickling runs code: a pickled job would run as root on the
worker that takes it. So every Queue, Worker and Job fetch of bake's uses RQ's JSON
serializer (`connect.SERIALIZER`) and a worker runs jobs as `BakeJob`, which:

- decodes a job's data as JSON alone: data that is not (a pickled job) is refused, never
  loaded;
- runs a job only when it calls bake's build function (`JOB_FUNC`) with one argument,
  the job's spec, that fits `SPEC_SCHEMA` (the recipe's name, the pack's place in the
  store and its SHA-256, the build options as BuildOptions JSON), with no instance, no
  keyword arguments, no callbacks and no webhooks;
- never imports a callback named in the job's hash, and never sends its webhooks.

A job refused fails at once (no retry) with a one-line reason in its result, and nothing
of it has run: the refusal is made before any function of the job is even looked up.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from rq.exceptions import DeserializationError
from rq.job import Job

from builder.core.errors import BakeError
from builder.pipeline.options import OPTIONS_SCHEMA
from builder.recipe.schema import recipe_schema
from .jobs import BadSpec, job_options

JOB_FUNC = "builder.farm.jobs.run_build"

SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["recipe", "bundle", "sha256", "options"],
    "properties": {
        "recipe": {"type": "string", "pattern": recipe_schema()["properties"]["name"]["pattern"]},
        "bundle": {"type": "string", "pattern": r"^recipes/[0-9a-f]{64}\.tar$"},
        "sha256": {"type": "string", "pattern": r"^[0-9a-f]{64}$"},
        "options": OPTIONS_SCHEMA,
        "submitted": {"type": ["string", "null"], "maxLength": 64},
        "submitted_from": {"type": ["string", "null"], "maxLength": 255},
    },
}


class Refused(BakeError):
    """A job from the queue that this worker does not run: nothing of it has run."""


class NotData(DeserializationError):
    """A job whose data is not JSON (RQ's pickle, or anything else): never loaded."""


def check_spec(spec: object) -> dict[str, Any]:
    """The spec of a farm job, checked against SPEC_SCHEMA (its options first, as
    `jobs.job_options` says of them); BadSpec names the first thing that does not fit."""
    job_options(spec)
    try:
        jsonschema.validate(spec, SPEC_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        name = spec.get("recipe") if isinstance(spec, dict) else None
        raise BadSpec(f"farm job of {str(name)[:80]!r}: not run: its spec does not fit: {where}: {e.message[:300]}") \
            from None
    assert isinstance(spec, dict)
    if spec["bundle"] != f"recipes/{spec['sha256']}.tar":
        raise BadSpec(f"farm job of {spec['recipe']}: not run: its spec does not fit: bundle {spec['bundle']} is "
                      f"not the pack of its sha256 {spec['sha256']}")
    return spec


def refusal(job: Job) -> str | None:
    """Why the worker must not run `job`, or None when it is bake's build with a spec
    that fits. Reads the job's JSON data and hash; imports and calls nothing of it."""
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except DeserializationError:
        return "its data is not JSON (a pickled job?); it was not loaded"
    if func_name != JOB_FUNC:
        return f"it calls {str(func_name)[:120]!r}, not bake's build ({JOB_FUNC})"
    shape: tuple[object, object, object] = (instance, args, kwargs)     # JSON: any of these may be anything
    if shape[0] is not None or shape[2] not in ({}, None) or not isinstance(shape[1], list) or len(shape[1]) != 1:
        return "bake's build takes one argument, the job's spec, and no instance or keyword arguments"
    named = [n for n in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")
             if getattr(job, n, None)]
    if named:
        return f"it names callbacks ({', '.join(n.strip('_') for n in named)}), which bake's jobs never have"
    if job.webhooks:
        return "it names webhooks, which bake's jobs never have"
    try:
        check_spec(args[0])
    except BadSpec as e:
        return str(e)
    return None


class BakeJob(Job):
    """An RQ job as a bake worker sees it: JSON data, bake's build alone (see the module
    docstring)."""

    def _deserialize_data(self) -> None:
        try:
            super()._deserialize_data()
        except DeserializationError:
            self.retries_left = 0               # the same bytes never decode: fail now, not after back-off
            raise NotData(f"farm job {self.id} refused: its data is not JSON (a pickled job?); it was not "
                          "loaded and nothing of it ran") from None

    def _execute(self) -> Any:
        why = refusal(self)
        if why is not None:
            self.retries_left = 0
            raise Refused(f"farm job {self.id} refused: {why}; nothing of it ran")
        return super()._execute()

    # bake's jobs have no callbacks and no webhooks: what a job's hash names is never
    # imported or called, even on the way to failing it
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status, *, exc_string: str | None = None) -> None:
        return None
