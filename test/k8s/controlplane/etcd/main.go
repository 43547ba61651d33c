// etcd for the test control plane: the upstream server command, built at the version in go.mod.
// Debian's etcd 3.4 breaks watches without a resourceVersion on this apiserver, hence our own.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
