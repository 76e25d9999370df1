from transfer.cli import run

run()
