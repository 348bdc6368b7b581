from cepe_rag.cli import main

main()
