from paser.cli import entry

entry()
