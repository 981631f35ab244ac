import subprocess
import sys
import time

from atom.process_age import seconds_since_process_start


def test_counts_from_process_birth_not_import() -> None:
    # A child that sleeps before importing: its age at import includes the sleep.
    code = (
        "import time; time.sleep(0.5)\n"
        "from atom.process_age import seconds_since_process_start as s\n"
        "print(s())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    age = float(out.stdout)
    assert 0.5 <= age < 30


def test_grows_with_time() -> None:
    first = seconds_since_process_start()
    assert first is not None and first > 0
    time.sleep(0.1)
    second = seconds_since_process_start()
    assert second is not None and second >= first + 0.05
