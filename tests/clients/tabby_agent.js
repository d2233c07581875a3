// Drives Tabby's own client library (the agent inside Tabby's IDE extensions) against a server:
//   node tabby_agent.js AGENT_DIR FILE_TEXT_WITH_<CURSOR>
// The server and token come from $HOME/.tabby-client/agent/config.toml, as for a user of the IDE extensions.
// Prints {"status": ..., "completion": {...}} as JSON on stdout.
const path = require("path");
const [agentDir, textWithCursor] = process.argv.slice(2);
const { TabbyAgent } = require(path.join(agentDir, "node_modules", "tabby-agent"));

(async () => {
  const agent = new TabbyAgent();
  // an in-memory data store: the agent would otherwise keep state under ~/.tabby-client
  const dataStore = { data: {}, load: async () => ({}), save: async () => {} };
  await agent.initialize({ dataStore });
  const status = agent.getStatus();
  let completion = null;
  if (status === "ready") {
    const position = textWithCursor.indexOf("<CURSOR>");
    completion = await agent.provideCompletions({
      filepath: "/project/app.py", language: "python", text: textWithCursor.replace("<CURSOR>", ""), position,
    });
  }
  console.log(JSON.stringify({ status, completion }));
  await agent.finalize();
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
