from steer.cli import main
import sys
sys.exit(main())
