from vhostd.cli import main

main()
