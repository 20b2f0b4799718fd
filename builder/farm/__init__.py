"""The build farm: bake on several boxes through RQ on Redis, with what must outlive
Redis (build records, logs, artifacts, the stage cache) in Walrus/S3.

    connect.py   where Redis and the store are (options, then BAKE_REDIS_URL / BAKE_FARM_STORE)
    lease.py     leases per recipe and per cache entry, renewed while held
    remote.py    the stage cache shared through the store
    records.py   durable build records: builds/<recipe>/<build-id>.json
    jobs.py      what a job does on a worker: the recipe fetched, leased, baked, recorded
    trust.py     what a worker takes from Redis: JSON jobs of bake's build with a spec that fits
    workers.py   a worker's start on its box: killed work horses' folders, a killed worker's name
    gc.py        retention in the store (`bake gc --farm`)
    hooks.py     the shared cache and the lease fence, plugged into the core at start

The commands (bake worker, submit, status; --farm for nightly, ls and gc) are
builder/cli/farm.py's and builder/cli/nightly.py's.
"""
