import os
import signal

# Ctrl-C while the rank imports and reads its config: nothing is written yet, so end at once
# (trainer.main installs the real handler first thing; an inherited "ignore" is kept)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

from trainer.startup import CLOCK  # noqa: E402

CLOCK.mark("interpreter")  # process creation → here: Python's own start
from trainer.gate import watch_gate  # noqa: E402

watch_gate()  # under `zerotune train`: a failed pre-flight ends this rank even mid-import
from trainer.main import main  # noqa: E402
from trainer.process import exit_process  # noqa: E402

exit_process(main())
