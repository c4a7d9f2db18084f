from modwatch.cli import main

main()
