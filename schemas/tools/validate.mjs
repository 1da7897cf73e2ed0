// Validates an AsyncAPI document with the official parser: exit 0 when valid, 1 otherwise.
// Usage: node schemas/tools/validate.mjs schemas/asyncapi.yaml
import { Parser, fromFile } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'info', 'hint'];
const path = process.argv[2];
if (!path) {
  console.error('usage: node validate.mjs ASYNCAPI_FILE');
  process.exit(2);
}

const { document, diagnostics } = await fromFile(new Parser(), path).parse();
for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join('.') : '<root>';
  console.log(`${SEVERITY[d.severity] ?? d.severity}: ${where}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
const warnings = diagnostics.filter((d) => d.severity === 1).length;
if (!document || errors > 0) {
  console.error(`${path}: INVALID (${errors} errors, ${warnings} warnings)`);
  process.exit(1);
}
console.log(
  `${path}: valid AsyncAPI ${document.version()}, ${document.allMessages().length} messages ` +
    `(${warnings} warnings)`,
);
