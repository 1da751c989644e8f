"""One module per tab of the leaderboard; each has `render(board, ...)` and reads only `board`."""
