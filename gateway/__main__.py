from nanoserve.gateway.cli import main

main()
