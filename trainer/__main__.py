from trainer.main import main
from trainer.process import exit_process

exit_process(main())
