import sys

from jaxnvrar.bench import main

sys.exit(main())
