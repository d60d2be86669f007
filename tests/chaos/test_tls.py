"""Redis over TLS (``rediss://``) with a password: trainer and producer work end to end, and certificates are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import BackendUnavailableError, QueueBackend, TrainableModel
from producer.queue import build_celery_app
from tests.chaos.conftest import make_tls_files
from tests.support.groups import make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


async def test_a_train_step_goes_end_to_end_over_rediss_with_a_password(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis(password="tls-pw", tls_dir=make_tls_files(tmp_path / "tls"))
    assert server.url.startswith("rediss://:tls-pw@") and "ssl_ca_certs=" in server.url
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w")
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("secure", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            result = await backend.train(model, make_groups(1), timeout=120)
            assert result.step == 1
    finally:
        worker.stop()


async def test_a_rediss_url_without_the_ca_refuses_a_self_signed_server(make_redis, tmp_path: Path) -> None:
    """Certificates are verified by default, by the job records' client and by Celery's broker connection."""
    server = make_redis(tls_dir=make_tls_files(tmp_path / "tls"))
    unverifiable = server.url.split("?")[0]
    async with QueueBackend(unverifiable, path=str(tmp_path / "logs")) as backend:
        with pytest.raises(BackendUnavailableError, match="certificate verify failed"):
            await backend.submit_train(TrainableModel("m", "chaos", base_model="b"), make_groups(1))

    app = build_celery_app(unverifiable)
    app.conf.broker_connection_max_retries = 0
    with pytest.raises(Exception, match="certificate verify failed"):
        app.send_task("trainq.train", args=[b""], queue="nowhere", retry=False)
    app.close()
