from hvctl.cli import main

main()
