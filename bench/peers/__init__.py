"""RQ and Celery run the same chains as our workers: adapters that start, feed and kill them.

Each adapter starts its system's own worker processes the way peer-benchmarks.md did, with
the settings listed there, submits chains through the system's ordinary API (RQ: the next job
enqueued by the step, or every job enqueued up front with ``depends_on``; Celery: ``chain()``),
and observes them only through :mod:`bench.marks` and the system's own registries.

This package imports nothing on purpose: RQ's forking worker imports the job module
(``rq_jobs``) in every work horse, which must not drag Celery in. The configurations are in
:mod:`bench.peers.registry`.
"""
