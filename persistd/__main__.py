from persistd.daemon import main

main()
