// Command benchtable prints the rows that a `make bench` run collected in
// one JSON file (BENCH_JSON) as the single table the README shows.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/veilmesh/veil/tests/benchreport"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtable BENCH_JSON")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "benchtable: %v\n", err)
		os.Exit(1)
	}
	var rows []benchreport.Row
	if err := json.Unmarshal(raw, &rows); err != nil {
		fmt.Fprintf(os.Stderr, "benchtable: read %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	benchreport.Print(os.Stdout, "Veil benchmarks (ratios measured side by side in this run; > 1 means Veil is faster)", rows)
}
