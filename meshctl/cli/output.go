package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"sigs.k8s.io/yaml"
)

// Output formats of -o.
const (
	formatTable = "table"
	formatJSON  = "json"
	formatYAML  = "yaml"
)

// outputFlag is the -o flag that every command with machine-readable output
// has.
type outputFlag struct{ format string }

func addOutputFlag(cmd *cobra.Command, o *outputFlag) {
	cmd.Flags().StringVarP(&o.format, "output", "o", formatTable, "output format: table, json or yaml")
}

func (o *outputFlag) check() error {
	switch o.format {
	case formatTable, formatJSON, formatYAML:
		return nil
	}
	return usageErrorf("invalid output format %q: want table, json or yaml", o.format)
}

// structured writes v as indented JSON or YAML; it reports false for table
// output, which each command renders itself.
func (o *outputFlag) structured(w io.Writer, v any) (bool, error) {
	return o.write(w, v, true)
}

// structuredCompact is structured with JSON on one line, for outputs whose
// exact form is a contract and that can be large.
func (o *outputFlag) structuredCompact(w io.Writer, v any) (bool, error) {
	return o.write(w, v, false)
}

func (o *outputFlag) write(w io.Writer, v any, indent bool) (bool, error) {
	switch o.format {
	case formatJSON:
		enc := json.NewEncoder(w)
		if indent {
			enc.SetIndent("", "  ")
		}
		if err := enc.Encode(v); err != nil {
			return true, fmt.Errorf("write JSON: %w", err)
		}
		return true, nil
	case formatYAML:
		b, err := yaml.Marshal(v)
		if err != nil {
			return true, fmt.Errorf("encode YAML: %w", err)
		}
		if _, err := w.Write(b); err != nil {
			return true, fmt.Errorf("write YAML: %w", err)
		}
		return true, nil
	}
	return false, nil
}

// palette colours table output when it goes to a terminal, and does nothing
// otherwise (pipes, files, tests), or when NO_COLOR is set
// (https://no-color.org).
type palette struct{ on bool }

func paletteFor(w io.Writer) palette {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" {
		return palette{}
	}
	return palette{on: term.IsTerminal(int(f.Fd()))}
}

// paint wraps s in an SGR colour code. Every code used in tables has two
// digits, so every painted cell carries the same 9 invisible bytes and
// tabwriter, which counts bytes, still aligns a column whose cells are all
// painted; header cells use plain for that.
func (p palette) paint(code, s string) string {
	if !p.on {
		return s
	}
	return "\x1b[" + code + "m" + s + "\x1b[0m"
}

func (p palette) red(s string) string    { return p.paint("31", s) }
func (p palette) green(s string) string  { return p.paint("32", s) }
func (p palette) yellow(s string) string { return p.paint("33", s) }
func (p palette) grey(s string) string   { return p.paint("90", s) }

// plain paints s in the default colour, to align it with painted cells.
func (p palette) plain(s string) string { return p.paint("39", s) }

// bold is for lines outside tables only.
func (p palette) bold(s string) string { return p.paint("1", s) }
