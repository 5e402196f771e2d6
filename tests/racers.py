"""What the racing processes of the concurrency tests run: several processes doing one thing at the
same moment (creating the state database, the MLflow store, the embedded data set).

A module of its own so that a fork server can import it once, with what the racers use: each racer
then starts in milliseconds, where a spawned one spends seconds importing before it reaches the
barrier. They stay separate processes racing on the same files, as drivers and commands do."""
import multiprocessing as mp

PRELOAD = ["racers", "bnnctl.orchestrator.store", "bnnctl.orchestrator.tracking", "mlflow.tracking",
           "bnnctl.workers.data.classification"]


def context():
    """The fork-server context (started, with :data:`PRELOAD` imported, on first use)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def race(target, args: tuple, n: int, timeout: float = 180) -> list:
    """Run ``target(*args, barrier, results)`` in ``n`` processes released together by a barrier;
    returns what each put in ``results`` (its outcome, or its error as a string)."""
    ctx = context()
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join()
    return outcomes


def open_store(url, barrier, results):
    from bnnctl.orchestrator.store import SchemaInfo, Store

    barrier.wait()  # every process creates the tables at the same moment
    try:
        store = Store(url)
        with store.session() as s:
            results.put(s.get(SchemaInfo, 1).version)
    except Exception as err:  # reported to the test instead of dying silently
        results.put(repr(err))


def open_tracker(uri, barrier, results):
    from bnnctl.orchestrator.tracking import Tracker

    barrier.wait()  # every process creates the store and the experiment at the same moment
    try:
        results.put(Tracker(uri, "race").experiment_id)
    except Exception as err:  # noqa: BLE001
        results.put(f"error {err!r}")


def write_digits(root, barrier, results):
    from bnnctl.workers.data.classification import write_digits_imagefolder

    barrier.wait()
    try:
        results.put(str(write_digits_imagefolder(root)))
    except Exception as err:  # noqa: BLE001
        results.put(f"error {err!r}")
