from paser.cli import main

main()
