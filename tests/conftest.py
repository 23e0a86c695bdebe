"""With ``EASY_CONTEXT_ACCEPTANCE_LOG`` set (bench/gpu_acceptance.sh sets it), every test appends
``PASS|FAIL|SKIP <test id> <recorded measurements>`` to that file; otherwise nothing happens."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("EASY_CONTEXT_ACCEPTANCE_LOG")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
    details = " ".join(f"{k}={v}" for k, v in report.user_properties)
    if report.outcome != "passed":
        crash = getattr(report.longrepr, "reprcrash", None)
        msg = crash.message if crash else (report.longrepr[-1] if isinstance(report.longrepr, tuple) else
                                          str(report.longrepr))
        details += " | " + (msg.splitlines() or [""])[0][:400]
    with open(path, "a") as f:
        f.write(f"{status} {report.nodeid} {details}\n")
