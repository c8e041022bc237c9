"""`python -m steerline.report` (`make report`)."""

from steerline.report.build import main

main()
