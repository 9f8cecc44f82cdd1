"""OS plumbing shared by both ends: namespaces, TUN devices, links, nft, exec."""
