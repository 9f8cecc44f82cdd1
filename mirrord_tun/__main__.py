from mirrord_tun.cli import main

main()
