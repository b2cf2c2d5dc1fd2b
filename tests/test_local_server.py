"""The local server's watchdog: a server that stops answering is started again on its port."""

from __future__ import annotations

import os
import signal
import time

import pytest

from esvr.models.local_server import answered_requests, answers_chat, serve_transformers
from esvr.models.openai_backend import OpenAIChat


@pytest.mark.slow
def test_a_wedged_server_is_started_again_and_answers(default_model_dir, tmp_path):
    log = tmp_path / "server.log"
    with serve_transformers(default_model_dir, log_path=log, watchdog_s=1.0, probe_timeout_s=5.0) as server:
        assert answers_chat(server.base_url, server.model, timeout_s=120)
        first_pid = server.pid
        # Stopped, the process still holds the port: the kernel accepts connections and nothing
        # answers them, as with a server whose batching loop has wedged.
        os.killpg(first_pid, signal.SIGSTOP)
        deadline = time.monotonic() + 300
        while server.restarts == 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert server.restarts == 1 and server.pid != first_pid
        with pytest.raises(ProcessLookupError):
            os.killpg(first_pid, 0)  # the wedged group is gone, not left stopped
        model = OpenAIChat(server.model, base_url=server.base_url, timeout_s=120)
        try:
            [reply] = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=4)
        finally:
            model.close()
        assert reply.strip()
        assert answered_requests(log) >= 2  # the log runs on across the restart
        second_pid = server.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(second_pid, 0)
