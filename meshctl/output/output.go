// Package output renders meshctl's reports: the machine-readable forms of
// -o json|yaml, the colour of table cells (only on a terminal), and the
// small formatting rules every table shares (durations, plurals, empty
// cells). It knows nothing of cobra or of the reports themselves.
//
//	if done, err := output.Structured(w, format, report); done || err != nil {
//		return err
//	}
//	pal := output.PaletteFor(w)
//	fmt.Fprintf(w, "%s\n", pal.Green("PASS"))
package output

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/term"
	"sigs.k8s.io/yaml"
)

// Output formats of -o.
const (
	Table = "table"
	JSON  = "json"
	YAML  = "yaml"
)

// ErrFormat is the error of Check for a format meshctl does not write.
var ErrFormat = errors.New("invalid output format")

// Check reports whether format is one of Table, JSON and YAML; its error
// wraps ErrFormat.
func Check(format string) error {
	switch format {
	case Table, JSON, YAML:
		return nil
	}
	return fmt.Errorf("%w %q: want table, json or yaml", ErrFormat, format)
}

// Structured writes v as indented JSON or YAML; it reports false for
// Table, which each command renders itself.
func Structured(w io.Writer, format string, v any) (bool, error) {
	return write(w, format, v, true)
}

// StructuredCompact is Structured with JSON on one line, for outputs whose
// exact form is a contract and that can be large.
func StructuredCompact(w io.Writer, format string, v any) (bool, error) {
	return write(w, format, v, false)
}

func write(w io.Writer, format string, v any, indent bool) (bool, error) {
	switch format {
	case JSON:
		enc := json.NewEncoder(w)
		if indent {
			enc.SetIndent("", "  ")
		}
		if err := enc.Encode(v); err != nil {
			return true, fmt.Errorf("write JSON: %w", err)
		}
		return true, nil
	case YAML:
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

// Palette colours table output when it goes to a terminal, and does nothing
// otherwise (pipes, files, tests), or when NO_COLOR is set
// (https://no-color.org). The zero Palette is off.
type Palette struct {
	// On paints; tests set it to check what a terminal would show.
	On bool
}

// PaletteFor is the palette for output to w: on only for a terminal.
func PaletteFor(w io.Writer) Palette {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" {
		return Palette{}
	}
	return Palette{On: term.IsTerminal(int(f.Fd()))}
}

// paint wraps s in an SGR colour code. Every code used in tables has two
// digits, so every painted cell carries the same 9 invisible bytes and
// tabwriter, which counts bytes, still aligns a column whose cells are all
// painted; header cells use Plain for that.
func (p Palette) paint(code, s string) string {
	if !p.On {
		return s
	}
	return "\x1b[" + code + "m" + s + "\x1b[0m"
}

func (p Palette) Red(s string) string    { return p.paint("31", s) }
func (p Palette) Green(s string) string  { return p.paint("32", s) }
func (p Palette) Yellow(s string) string { return p.paint("33", s) }
func (p Palette) Grey(s string) string   { return p.paint("90", s) }

// Plain paints s in the default colour, to align it with painted cells.
func (p Palette) Plain(s string) string { return p.paint("39", s) }

// Bold is for lines outside tables only.
func (p Palette) Bold(s string) string { return p.paint("1", s) }

// Dash is s, or "-" for an empty table cell.
func Dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// OrUnknown is s, or "unknown" for a version or name nobody reported.
func OrUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// Plural is "1 word" or "n words" ("policy" becomes "policies").
func Plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	if strings.HasSuffix(word, "y") {
		return fmt.Sprintf("%d %sies", n, strings.TrimSuffix(word, "y"))
	}
	return fmt.Sprintf("%d %ss", n, word)
}

// Age is how long before now t was, as ShortDuration; a t after now is 0s.
func Age(now, t time.Time) string {
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	return ShortDuration(d)
}

// ShortDuration is d in at most two units, to the second: 45s, 3m20s, 5h,
// 2d3h.
func ShortDuration(d time.Duration) string {
	d = d.Truncate(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		m, s := int(d/time.Minute), int(d%time.Minute/time.Second)
		if s == 0 {
			return fmt.Sprintf("%dm", m)
		}
		return fmt.Sprintf("%dm%ds", m, s)
	case d < 24*time.Hour:
		h, m := int(d/time.Hour), int(d%time.Hour/time.Minute)
		if m == 0 {
			return fmt.Sprintf("%dh", h)
		}
		return fmt.Sprintf("%dh%dm", h, m)
	}
	days, h := int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour)
	if h == 0 {
		return fmt.Sprintf("%dd", days)
	}
	return fmt.Sprintf("%dd%dh", days, h)
}
