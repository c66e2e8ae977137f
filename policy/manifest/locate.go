package manifest

import (
	"fmt"
	"strconv"
	"strings"

	yamlv3 "go.yaml.in/yaml/v3"
)

// lineOf returns the line in the file of the field at path (a field.Path
// string: "spec.ingress[0].from[1].podSelector.matchLabels[app]") in the
// document, or of the deepest part of the path that exists; 0 when the
// document cannot be parsed.
func (d *document) lineOf(path string) int {
	line, _ := d.locate(path)
	return line
}

// locate is lineOf that also returns the path it followed, with list indices
// filled in where path had none: encoding/json names a badly typed field
// "spec.ingress.ports.port", and the first list item holding the next field
// is the best guess at which one was meant.
func (d *document) locate(path string) (int, string) {
	if d == nil {
		return 0, path
	}
	n := d.root()
	if n == nil {
		return 0, path
	}
	line := n.Line
	steps := splitFieldPath(path)
	var followed strings.Builder
	for i := 0; i < len(steps); i++ {
		step := steps[i]
		if n.Kind == yamlv3.AliasNode && n.Alias != nil {
			n = n.Alias
		}
		var next *yamlv3.Node
		stepLine := 0
		switch n.Kind {
		case yamlv3.MappingNode:
			if v, k := mapValue(n, step); v != nil {
				next, stepLine = v, k.Line
				if followed.Len() > 0 {
					followed.WriteByte('.')
				}
				followed.WriteString(step)
			}
		case yamlv3.SequenceNode:
			if idx, err := strconv.Atoi(step); err == nil && idx >= 0 && idx < len(n.Content) {
				next, stepLine = n.Content[idx], n.Content[idx].Line
				fmt.Fprintf(&followed, "[%d]", idx)
				break
			}
			for idx, item := range n.Content {
				if v, _ := mapValue(item, step); v != nil {
					next, stepLine = item, item.Line
					fmt.Fprintf(&followed, "[%d]", idx)
					i-- // the step is taken again inside the item
					break
				}
			}
		}
		if next == nil {
			followed.Reset()
			followed.WriteString(path)
			break
		}
		n, line = next, stepLine
	}
	return d.line + line - 1, followed.String()
}

// root parses the document once, on first use, and returns its top node,
// or nil when it does not parse.
func (d *document) root() *yamlv3.Node {
	if !d.parsed {
		d.parsed = true
		var doc yamlv3.Node
		if err := yamlv3.Unmarshal(d.src, &doc); err == nil && len(doc.Content) > 0 {
			d.tree = doc.Content[0]
		}
	}
	return d.tree
}

func mapValue(n *yamlv3.Node, key string) (value, keyNode *yamlv3.Node) {
	if n.Kind != yamlv3.MappingNode {
		return nil, nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1], n.Content[i]
		}
	}
	return nil, nil
}

// splitFieldPath cuts "a.b[0].c[key.with.dots]" into a, b, 0, c,
// key.with.dots.
func splitFieldPath(path string) []string {
	var steps []string
	for path != "" {
		switch path[0] {
		case '.':
			path = path[1:]
		case '[':
			end := strings.IndexByte(path, ']')
			if end < 0 {
				return append(steps, path[1:])
			}
			steps = append(steps, path[1:end])
			path = path[end+1:]
		default:
			end := strings.IndexAny(path, ".[")
			if end < 0 {
				return append(steps, path)
			}
			steps = append(steps, path[:end])
			path = path[end:]
		}
	}
	return steps
}
