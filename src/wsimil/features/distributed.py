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
    wsimil extract --job /shared/job --mag 20 --encoder uni --weights /shared/uni.bin \\
                   --device cuda --backend ray --ray-address HEAD_IP:6379

Without ``--ray-address`` a local Ray instance is started (and stopped) on this machine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from wsimil.claims import CLAIM_TIMEOUT
from wsimil.errors import WsimilError


def _ray():
    try:
        import ray
    except ImportError as e:
        raise WsimilError("--backend ray needs Ray: pip install 'wsimil[ray]' (or pip install ray)") from e
    return ray


def run_extraction_ray(
    job: Path,
    st,
    slides: list[dict],
    patch_size: int,
    overwrite: bool,
    address: str | None = None,
    cpus_per_actor: int = 1,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> list[dict]:
    ray = _ray()
    from wsimil.progress import make_progress

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
        settings = dataclasses.asdict(st)
        if not use_gpu:
            settings["device"] = "cpu"
            settings["workers"] = 0  # no nested worker processes inside actors

        @ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor)
        class EncoderActor:
            def __init__(self, settings: dict):
                import warnings

                from wsimil.features.encoders import create_encoder
                from wsimil.features.extract import ExtractSettings

                self.st = ExtractSettings(**settings)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the driver already warned about random weights
                    self.encoder = create_encoder(self.st.encoder, self.st.weights, self.st.seed)
                self.encoder.model.to(self.st.device)

            def run(self, job: str, slide: dict, patch_size: int, overwrite: bool) -> dict:
                from wsimil.features.extract import process_slide

                return process_slide(self.encoder, Path(job), self.st, slide, patch_size, overwrite, claim_timeout)

        actors = [EncoderActor.remote(settings) for _ in range(n_actors)]
        pool = ray.util.ActorPool(actors)
        rows: dict[str, dict] = {}
        with make_progress() as progress:
            task = progress.add_task(
                f"Encoding {st.mag:g}x with {st.encoder} on Ray ({n_actors} actors)", total=len(slides), info=""
            )
            for row in pool.map_unordered(lambda a, s: a.run.remote(str(job), s, patch_size, overwrite), slides):
                rows[row["slide_id"]] = row
                progress.update(task, advance=1, info=f"{row['slide_id']}: {row['status']}")
        return [rows[s["slide_id"]] for s in slides]
    finally:
        if started:
            ray.shutdown()
