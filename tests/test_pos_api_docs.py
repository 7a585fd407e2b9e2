"""The curl examples of docs/pos-api.md, run in order against a real agent: the docs stay true.

Each ``sh`` block with a ``curl`` is run by bash with ``$TOKEN`` set and the
documented address replaced by the test agent's.  Every answer must be JSON
and 2xx, except where the block says ``# expect: NNN`` (its last answer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from conftest import REPO_ROOT
from lane_harness import TOKEN, Lane

DOC = REPO_ROOT / "docs" / "pos-api.md"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
STATUS = re.compile(r"\n<<(\d{3})>>")


def examples() -> list[str]:
    return [block for block in BLOCK.findall(DOC.read_text(encoding="utf-8")) if "curl " in block]


def test_the_docs_have_an_example_for_every_endpoint() -> None:
    text = "\n".join(examples())
    for path in ("/v1/status", "/v1/identify", "/v1/price", "/v1/sales", "/v1/returns", "/void"):
        assert path in text, path


def test_every_curl_example_works_against_a_real_agent(tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is installed by scripts/ensure-system.sh"
    lane = Lane(tmp_path / "lane")
    lane.import_members()
    lane.start()
    try:
        for block in examples():
            script = block.replace("http://127.0.0.1:8765", lane.url).replace(
                "curl -sS", "curl -sS -w '\\n<<%{http_code}>>\\n'"
            )
            result = subprocess.run(
                ["bash", "-c", script],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, "TOKEN": TOKEN},
                timeout=30,
                check=False,
            )
            statuses = [int(code) for code in STATUS.findall(result.stdout)]
            bodies = [part for part in STATUS.split(result.stdout)[::2] if part.strip()]
            assert statuses, f"no answer: {block}\n{result.stderr}"
            for body in bodies:
                json.loads(body)
            expected = re.search(r"# expect: (\d{3})", block)
            if expected:
                assert statuses[-1] == int(expected.group(1)), (block, result.stdout)
                assert all(200 <= s < 300 for s in statuses[:-1]), (block, result.stdout)
            else:
                assert result.returncode == 0, (block, result.stdout, result.stderr)
                assert all(200 <= s < 300 for s in statuses), (block, result.stdout)
    finally:
        assert lane.stop() == 0
