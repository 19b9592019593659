import sys

from kubetune_trainer.main import main

sys.exit(main())
