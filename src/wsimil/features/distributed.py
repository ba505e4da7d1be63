"""Feature extraction on a Ray cluster: one task per slide, run by encoder actors that each hold the model.

With GPUs in the cluster there is one actor per GPU (``num_gpus=1``); without, ``max(1, CPUs // cpus_per_actor)``
CPU actors. Every actor builds the encoder from the same name, weights and seed, and runs the same per-slide code
as the local backend, so the features are identical.

Multi-node recipe (slides, the job folder and any weights file on a filesystem every node mounts at the same path)::

    # head node
    ray start --head --port=6379
    # each worker node
    ray start --address=HEAD_IP:6379
    # anywhere in the cluster
    wsimil extract --job /shared/job --mag 20 --encoder uni --encoder-weights /shared/uni.bin \\
                   --device cuda --backend ray --ray-address HEAD_IP:6379

Without ``--ray-address`` a local Ray instance is started (and stopped) on this machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from wsimil.claims import CLAIM_TIMEOUT
from wsimil.errors import WsimilError


def _ray():
    try:
        import ray
    except ImportError as e:
        raise WsimilError("--backend ray needs Ray: pip install 'wsimil[ray]' (or pip install ray)") from e
    return ray


def run_extraction_ray(
    job,
    st,
    slides: list[dict],
    overwrite: bool,
    process: Callable,
    address: str | None = None,
    cpus_per_actor: int = 1,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> list[dict]:
    """Encode ``slides`` of the tiling ``job`` with settings ``st`` on Ray: each actor builds the encoder once and
    calls ``process(encoder, job, st, slide, overwrite, claim_timeout)`` (the local backend's per-slide function,
    passed in so this module does not import the extraction module that calls it) per slide."""
    ray = _ray()
    from wsimil.progress import make_progress
    from wsimil.slide.mag import mag_name

    started = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,
            )
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise WsimilError(f"cannot start or reach {where}: {e}") from e
        started = True
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_gpu = gpus > 0 and st.device.startswith("cuda")
        n_actors = gpus if use_gpu else max(1, int(res.get("CPU", 1)) // cpus_per_actor)
        n_actors = max(1, min(n_actors, len(slides)))
        if not use_gpu:
            st = dataclasses.replace(st, device="cpu", workers=0)  # no nested worker processes inside actors

        @ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor)
        class EncoderActor:
            def __init__(self, st, job):
                import warnings

                from wsimil.features.encoders import create_encoder

                self.st, self.job = st, job
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the driver already warned about random weights
                    self.encoder = create_encoder(self.st.encoder, self.st.weights, self.st.seed)
                self.encoder.model.to(self.st.device)

            def run(self, slide: dict, overwrite: bool) -> dict:
                return process(self.encoder, self.job, self.st, slide, overwrite, claim_timeout)

        actors = [EncoderActor.remote(st, job) for _ in range(n_actors)]
        pool = ray.util.ActorPool(actors)
        rows: dict[str, dict] = {}
        with make_progress() as progress:
            task = progress.add_task(
                f"Encoding {mag_name(st.mag)} with {st.encoder} on Ray ({n_actors} actors)", total=len(slides), info=""
            )
            for row in pool.map_unordered(lambda a, s: a.run.remote(s, overwrite), slides):
                rows[row["slide_id"]] = row
                progress.update(task, advance=1, info=f"{row['slide_id']}: {row['status']}")
        return [rows[s["slide_id"]] for s in slides]
    finally:
        if started:
            ray.shutdown()
