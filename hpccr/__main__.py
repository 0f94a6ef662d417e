from hpccr.cli import main

main()
