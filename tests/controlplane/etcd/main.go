// etcd's own entry point (go.etcd.io/etcd/v3's main.go), built at the version k8s.io/kubernetes
// pins for its etcd client.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
