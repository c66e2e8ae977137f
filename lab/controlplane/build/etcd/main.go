// Command etcd is the upstream etcd server built from the
// go.etcd.io/etcd/server/v3 module pinned in go.mod, for Veil's local test
// lab.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
