// Command meshctl inspects the Veil mesh; see `meshctl --help`.
package main

import (
	"os"

	"github.com/veilmesh/veil/lab/netns"
	"github.com/veilmesh/veil/meshctl/cli"
)

func main() {
	// The lab's pod servers are this binary re-executed (meshctl lab up).
	netns.MaybeRunHelper()
	os.Exit(cli.Main(os.Args[1:], cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr}))
}
