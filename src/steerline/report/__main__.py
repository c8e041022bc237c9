"""`python -m steerline.report` (`make report`)."""

from steerline.report import main

main()
